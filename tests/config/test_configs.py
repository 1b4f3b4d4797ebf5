"""Every config in configs/ builds its real architecture, trains one step and runs inference on a
tiny image on CPU (a new config is picked up automatically).

Only MODEL.WEIGHTS (no downloads), MODEL.DEVICE and the input sizes are overridden; heads,
backbones, DCN layers, grids and scale ranges are the config's own. The inputs go through
SOLODatasetMapper, so each config's mask strides (one per level for SOLO / Decoupled SOLO) come
from the same code as in training.

Cost: the heads run on the S x S grids (3872 cells, 512-wide towers for SOLOv2) whatever the image
size, and deformable convs run on torchvision's CPU kernels, so a full-size model takes seconds
per step. Configs that differ only outside MODEL (schedule, input sizes: e.g. SOLO_R50_1x and
SOLO_R50_3x) share one architecture: the training step and inference run once per architecture,
and every other config of it is built and checked to have exactly the same parameters. Configs
with deformable convs in every tower conv (SOLOv2 R101/X101-DCN) are marked ``e2e``: their
training step runs torchvision's CPU deformable-conv backward over the 3872 cells of 512-wide
towers, about 45 s each on one core.
"""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO, solo_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from solo_d2.engine.trainer import build_mapper
from solo_d2.modeling import PanopticSOLO, is_panoptic
from solo_d2.modeling.dcn import DeformConv, DeformConvPack
from solo_d2.modeling.heads import SOLO_HEAD_REGISTRY

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
H, W = 64, 96
# architecture key -> {parameter and buffer name: shape} of the config that ran the full test
_TESTED_ARCHITECTURES = {}


def load_cfg(name: str):
    return solo_cfg(
        name,
        [
            "MODEL.WEIGHTS", "",
            "MODEL.DEVICE", "cpu",
            "INPUT.MIN_SIZE_TRAIN", (H,),
            "INPUT.MAX_SIZE_TRAIN", W,
            "INPUT.MIN_SIZE_TEST", H,
            "INPUT.MAX_SIZE_TEST", W,
        ],
    )  # fmt: skip


def architecture_key(cfg) -> str:
    """Everything under MODEL except the weights file and the device."""
    model = cfg.MODEL.clone()
    model.defrost()
    model.WEIGHTS, model.DEVICE = "", ""
    return model.dump()


def _config_params():
    for name in CONFIGS:
        solo = load_cfg(name).MODEL.SOLO
        slow = bool(solo.TOWER_DCN) and solo.TOWER_DCN_CONVS == "all"
        yield pytest.param(name, marks=[pytest.mark.e2e] if slow else [], id=name)


def dataset_dict(tmp_path: Path, num_classes: int):
    """A 64x96 image with a square and a triangle (polygons, as COCO annotations)."""
    image = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), image)
    square = [6.0, 8.0, 38.0, 8.0, 38.0, 40.0, 6.0, 40.0]
    triangle = [50.0, 10.0, 90.0, 60.0, 45.0, 58.0]
    annos = [
        {"bbox": [6, 8, 32, 32], "bbox_mode": 1, "segmentation": [square], "category_id": 0},
        {
            "bbox": [45, 10, 45, 50],
            "bbox_mode": 1,
            "segmentation": [triangle],
            "category_id": num_classes - 1,
        },
    ]
    return {"file_name": str(path), "height": H, "width": W, "image_id": 1, "annotations": annos}


def panoptic_dataset_dict(tmp_path: Path, num_classes: int):
    """:func:`dataset_dict`'s image as panoptic data: the square and the triangle are thing
    segments, the rest is stuff 1 (top) and stuff 2 (bottom)."""
    d = dataset_dict(tmp_path, num_classes)
    ids = np.where(np.arange(H)[:, None] < H // 2, 2001, 2002) * np.ones((1, W), dtype=np.int64)
    segments = [
        {"id": 2001, "category_id": 1, "isthing": False},
        {"id": 2002, "category_id": 2, "isthing": False},
    ]
    for k, anno in enumerate(d.pop("annotations")):
        polygon = np.round(np.array(anno["segmentation"][0]).reshape(-1, 2)).astype(np.int32)
        mask = cv2.fillPoly(np.zeros((H, W), np.uint8), [polygon], 1).astype(bool)
        ids[mask] = 1001 + k
        segments.append({"id": 1001 + k, "category_id": anno["category_id"], "isthing": True})
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "panoptic.png"), rgb[..., ::-1])
    return {**d, "pan_seg_file_name": str(tmp_path / "panoptic.png"), "segments_info": segments}


def make_confident(model):
    """Raise the mask output biases and one class's bias so every inference stage has candidates
    (one class only: every grid cell passes the score threshold, a few thousand candidates)."""
    head = model.ins_head
    with torch.no_grad():
        head.cate_pred.bias[0] = 3.0
        for name, p in head.named_parameters():
            if name.startswith(("kernel_pred.", "mask_preds")) and name.endswith("bias"):
                p.fill_(5.0)


def expected_deform_convs(cfg) -> int:
    """Deformable convs the config asks for: towers, mask-feature branch, backbone blocks."""
    sc, r = cfg.MODEL.SOLO, cfg.MODEL.RESNETS
    towers = {
        "SOLOv2InstanceHead": 2,  # category + kernel
        "SOLOInstanceHead": 2,  # category + mask
        "DecoupledSOLOInstanceHead": 3,  # category + mask x + mask y
        "DecoupledSOLOLightInstanceHead": 2,  # category + shared mask
    }[sc.HEAD]
    per_tower = (
        0 if not sc.TOWER_DCN else (1 if sc.TOWER_DCN_CONVS == "last" else sc.NUM_INSTANCE_CONVS)
    )
    n = towers * per_tower
    if sc.MASK_DCN:
        levels = len(sc.MASK_IN_FEATURES)
        n += sum(max(level, 1) for level in range(levels)) + 1  # + the 1x1 conv_pred
    blocks = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}[r.DEPTH]
    return n + sum(b for b, on in zip(blocks, r.DEFORM_ON_PER_STAGE) if on)


def test_every_published_model_has_a_config():
    expected = {
        "SOLO_R50_1x", "SOLO_R50_3x", "SOLO_R101_3x",
        "Decoupled_SOLO_R50_1x", "Decoupled_SOLO_R50_3x", "Decoupled_SOLO_R101_3x",
        "Decoupled_SOLO_Light_R50_3x", "Decoupled_SOLO_Light_DCN_R50_3x",
        "SOLOv2_R50_1x", "SOLOv2_R50_3x", "SOLOv2_R101_3x", "SOLOv2_R101_DCN_3x",
        "SOLOv2_X101_DCN_3x", "SOLOv2_Light_448_R18_3x", "SOLOv2_Light_448_R34_3x",
        "SOLOv2_Light_448_R50_3x", "SOLOv2_Light_512_DCN_R50_3x",
    }  # fmt: skip
    assert expected <= {Path(c).stem for c in CONFIGS}


@pytest.mark.parametrize("name", list(_config_params()))
def test_config_builds_trains_one_step_and_infers(name, tmp_path):
    cfg = load_cfg(name)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert type(model.ins_head) is SOLO_HEAD_REGISTRY.get(cfg.MODEL.SOLO.HEAD)
    assert model.ins_head.num_grids == list(cfg.MODEL.SOLO.NUM_GRIDS)
    assert (model.mask_head is not None) == model.ins_head.uses_mask_features
    deform = [m for m in model.modules() if isinstance(m, DeformConv)]
    assert len(deform) == expected_deform_convs(cfg)
    packs = [m for m in deform if isinstance(m, DeformConvPack)]
    assert all(m.modulated == ("DCNv2" in (cfg.MODEL.SOLO.TOWER_DCN, cfg.MODEL.SOLO.MASK_DCN))
               for m in packs)  # fmt: skip
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    key = architecture_key(cfg)
    if key in _TESTED_ARCHITECTURES:  # same model as a config that passed the full test
        assert shapes == _TESTED_ARCHITECTURES[key]
        return

    panoptic = is_panoptic(cfg)
    assert isinstance(model, PanopticSOLO) == panoptic
    make_dict = panoptic_dataset_dict if panoptic else dataset_dict
    mapper = build_mapper(cfg, is_train=True)
    inputs = [mapper(make_dict(tmp_path, cfg.MODEL.SOLO.NUM_CLASSES))]
    assert len(inputs[0]["instances"]) == 2
    model.train()
    with EventStorage():
        losses = model(inputs)
    assert set(losses) == {"loss_cls", "loss_mask"} | ({"loss_sem_seg"} if panoptic else set())
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] > 0  # the two objects have positive cells on some level
    sum(losses.values()).backward()
    head_grads = [p.grad for p in model.ins_head.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in head_grads)

    model.eval()
    make_confident(model)
    test_mapper = build_mapper(cfg, is_train=False)
    x = test_mapper(make_dict(tmp_path, cfg.MODEL.SOLO.NUM_CLASSES))
    with torch.no_grad():
        (out,) = model([{**x, "height": 2 * H, "width": 2 * W}])
    inst = out["instances"]
    assert 0 < len(inst) <= cfg.TEST.DETECTIONS_PER_IMAGE
    assert inst.pred_masks.dtype == torch.bool and inst.pred_masks.shape[1:] == (2 * H, 2 * W)
    assert torch.all(inst.scores[:-1] >= inst.scores[1:])
    assert inst.pred_classes.min() >= 0 and inst.pred_classes.max() < cfg.MODEL.SOLO.NUM_CLASSES
    if panoptic:
        seg, segments = out["panoptic_seg"]
        assert seg.shape == (2 * H, 2 * W)
        assert out["sem_seg"].shape == (cfg.MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES + 1, 2 * H, 2 * W)
        assert {int(i) for i in seg.unique()} <= {0} | {s["id"] for s in segments}
    _TESTED_ARCHITECTURES[key] = shapes
