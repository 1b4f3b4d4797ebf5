"""The SOLO family on one engine: SOLO v1, Decoupled SOLO (and light) next to SOLOv2.

Hand cases for what differs between the variants (SOLO, Wang et al., TPAMI 2021): Decoupled
SOLO's mask composition sigmoid(Y[i]) * sigmoid(X[j]) and its index mapping across levels,
SOLO's per-cell maps, mask targets at stride/2 per level, last-instance-wins on shared cells;
then tiny models of every head trained, run and exported end to end on CPU.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import confident_tiny_model, make_input, tiny_cfg, train_step
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from solo_d2 import mask_target_strides
from solo_d2.data.dataset_mapper import SOLODatasetMapper
from solo_d2.export.compare import compare_detections
from solo_d2.modeling.dcn import DeformConvPack
from solo_d2.modeling.heads import (
    SOLO_HEAD_REGISTRY,
    DecoupledSOLOInstanceHead,
    DecoupledSOLOLightInstanceHead,
    SOLOInstanceHead,
    SOLOv2InstanceHead,
)
from solo_d2.modeling.losses import dice_loss
from solo_d2.modeling.postprocessing import cell_levels
from solo_d2.modeling.targets import (
    assign_grid_targets,
    extra_mask_targets,
    mask_target_field,
    rescale_masks,
)

HEADS = [
    "SOLOv2InstanceHead",
    "SOLOInstanceHead",
    "DecoupledSOLOInstanceHead",
    "DecoupledSOLOLightInstanceHead",
]


def family_cfg(head: str, **solo):
    cfg = tiny_cfg()
    cfg.MODEL.SOLO.HEAD = head
    for k, v in solo.items():
        cfg.MODEL.SOLO[k] = v
    return cfg


def family_input(cfg, h, w, boxes=(), classes=(), seed=0):
    """make_input plus the masks at every stride the config's model predicts at (as the mapper)."""
    x = make_input(h, w, boxes, classes, seed)
    masks = torch.zeros((len(boxes), h, w), dtype=torch.bool)
    for m, (x1, y1, x2, y2) in zip(masks, boxes):
        m[y1:y2, x1:x2] = True
    strides = mask_target_strides(cfg)
    for name, small in extra_mask_targets(masks, min(strides), strides).items():
        x["instances"].set(name, small)
    return x


# --------------------------------------------------------------------------------------------
# index mapping and mask composition (hand cases)
# --------------------------------------------------------------------------------------------


def test_cell_levels_hand_case():
    """Grids (2, 3): level 0 has cells 0..3, level 1 cells 4..12."""
    levels, local = cell_levels(torch.tensor([0, 3, 4, 9, 12]), [2, 3])
    assert levels.tolist() == [0, 0, 1, 1, 1]
    assert local.tolist() == [0, 3, 0, 5, 8]


def small_head(cls, grids):
    return cls(
        in_channels=8, num_classes=2, num_grids=grids, channels=8, num_convs=1, norm="",
        prior_prob=0.01,
    )  # fmt: skip


def decoupled_soft_masks(x_probs, y_probs, cells, grids):
    """The Decoupled head's soft masks of ``cells`` when its X / Y maps, levels concatenated,
    are ``x_probs`` / ``y_probs`` (sum S_l, H, W) already at the canvas size."""
    preds, off = [], 0
    for s in grids:  # per level (1, [X, Y], S_l, H, W) logits
        preds.append(
            torch.logit(torch.stack([x_probs[off : off + s], y_probs[off : off + s]]))[None]
        )
        off += s
    head = small_head(DecoupledSOLOInstanceHead, grids)
    return head.soft_mask_fn(preds, None, 0, tuple(x_probs.shape[-2:]))(cells)


def test_decoupled_composition_and_index_mapping_hand_case():
    """Grids (2, 3): 2 + 3 = 5 X maps and 5 Y maps, map m filled with a distinct constant.
    X[m] = 0.1 * (m + 1), Y[m] = 0.01 * (m + 1).
        cell 3 (level 0, k=3: i=1, j=1)        -> X[0+1] * Y[0+1] = 0.2 * 0.02
        cell 4 (level 1, k=0: i=0, j=0)        -> X[2+0] * Y[2+0] = 0.3 * 0.03
        cell 9 (level 1, k=5: i=1, j=2)        -> X[2+2] * Y[2+1] = 0.5 * 0.04
        cell 10 (level 1, k=6: i=2, j=0)       -> X[2+0] * Y[2+2] = 0.3 * 0.05
        cell 1 (level 0, k=1: i=0, j=1)        -> X[1] * Y[0]     = 0.2 * 0.01"""
    values = torch.arange(1, 6, dtype=torch.float64)
    x_probs = (0.1 * values).view(5, 1, 1).expand(5, 2, 3)
    y_probs = (0.01 * values).view(5, 1, 1).expand(5, 2, 3)
    out = decoupled_soft_masks(x_probs, y_probs, torch.tensor([3, 4, 9, 10, 1]), [2, 3])
    expected = torch.tensor([0.2 * 0.02, 0.3 * 0.03, 0.5 * 0.04, 0.3 * 0.05, 0.2 * 0.01])
    assert out.shape == (5, 2, 3)
    torch.testing.assert_close(out[:, 0, 0], expected.double())
    assert torch.equal(out, out[:, :1, :1].expand(5, 2, 3))


def test_decoupled_composition_is_pixelwise_product():
    """Non-constant maps: the mask is the pixel-wise product of one row map and one column map."""
    g = torch.Generator().manual_seed(0)
    x_probs = torch.rand(5, 4, 6, generator=g, dtype=torch.float64) * 0.98 + 0.01
    y_probs = torch.rand(5, 4, 6, generator=g, dtype=torch.float64) * 0.98 + 0.01
    out = decoupled_soft_masks(x_probs, y_probs, torch.tensor([9]), [2, 3])
    torch.testing.assert_close(out[0], y_probs[3] * x_probs[4])


@pytest.mark.parametrize(
    "head_cls", [SOLOInstanceHead, DecoupledSOLOInstanceHead, DecoupledSOLOLightInstanceHead]
)
def test_soft_masks_of_no_cells_are_empty(head_cls):
    """n = 0 cells (nothing passed the score threshold) gives (0, Hf, Wf), not an error."""
    head = small_head(head_cls, [2, 3])
    feats = [torch.randn(1, 8, 4, 6), torch.randn(1, 8, 2, 3)]
    _, mask_preds = head(feats)
    out = head.soft_mask_fn(mask_preds, None, 0, (8, 12))(torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, 8, 12)


def test_decoupled_head_soft_masks_follow_the_reference_order():
    """soft_mask_fn: sigmoid each level's maps, resize them to the canvas, then multiply; level 1
    maps are at half the canvas resolution so the resize matters."""
    head = small_head(DecoupledSOLOInstanceHead, [2, 3])
    g = torch.Generator().manual_seed(0)
    preds = [torch.randn(1, 2, 2, 8, 12, generator=g), torch.randn(1, 2, 3, 4, 6, generator=g)]
    fn = head.soft_mask_fn(preds, None, 0, (8, 12))
    # cell 9 = level 1, i = 1, j = 2
    up = F.interpolate(preds[1][0].sigmoid(), size=(8, 12), mode="bilinear")
    torch.testing.assert_close(fn(torch.tensor([9]))[0], up[1, 1] * up[0, 2])
    # cell 2 = level 0, i = 1, j = 0: same resolution, no resize
    torch.testing.assert_close(
        fn(torch.tensor([2]))[0], preds[0][0, 1, 1].sigmoid() * preds[0][0, 0, 0].sigmoid()
    )


def test_decoupled_positive_masks_in_training():
    head = DecoupledSOLOInstanceHead(
        in_channels=8, num_classes=2, num_grids=[3], channels=8, num_convs=1, norm="",
        prior_prob=0.01,
    )  # fmt: skip
    pred = torch.randn(2, 2, 3, 5, 7)  # (B, [X, Y], S, h, w)
    out = head.positive_masks(pred, None, torch.tensor([1, 0]), torch.tensor([5, 3]))
    # image 1, cell 5: i = 1, j = 2; image 0, cell 3: i = 1, j = 0
    torch.testing.assert_close(out[0], pred[1, 1, 1].sigmoid() * pred[1, 0, 2].sigmoid())
    torch.testing.assert_close(out[1], pred[0, 1, 1].sigmoid() * pred[0, 0, 0].sigmoid())


def test_solo_v1_level_soft_masks_hand_case():
    """Grids (2, 1): cell 4 is level 1's only cell; its 1x1 map of logit ln 3 -> 0.75 resized
    to the canvas stays 0.75 everywhere; cell 1 reads channel 1 of level 0."""
    maps = [torch.zeros(1, 4, 2, 2), torch.full((1, 1, 1, 1), math.log(3.0))]
    maps[0][0, 1] = torch.tensor([[20.0, -20.0], [-20.0, 20.0]])
    out = small_head(SOLOInstanceHead, [2, 1]).soft_mask_fn(maps, None, 0, (2, 2))(
        torch.tensor([4, 1])
    )
    torch.testing.assert_close(out[0], torch.full((2, 2), 0.75))
    torch.testing.assert_close(out[1], torch.tensor([[1.0, 0.0], [0.0, 1.0]]), atol=1e-6, rtol=0)


def test_solo_v1_positive_masks_read_the_cell_channel():
    head = SOLOInstanceHead(
        in_channels=8, num_classes=2, num_grids=[2], channels=8, num_convs=1, norm="",
        prior_prob=0.01,
    )  # fmt: skip
    pred = torch.randn(2, 4, 6, 6)
    out = head.positive_masks(pred, None, torch.tensor([1, 1, 0]), torch.tensor([3, 0, 2]))
    torch.testing.assert_close(out, pred[[1, 1, 0], [3, 0, 2]].sigmoid())


# --------------------------------------------------------------------------------------------
# targets: last instance wins, mask strides
# --------------------------------------------------------------------------------------------


def test_last_instance_wins_keeps_one_positive_per_cell():
    """Two instances on a 4x4 grid of a 64x64 canvas whose 3x3 regions overlap in cells 5, 6,
    9, 10 (instance 0 centred in cell 5: cells 0-2, 4-6, 8-10; instance 1 centred in cell 10:
    cells 5-7, 9-11, 13-15). SOLOv2 keeps both instances on the shared cells; SOLO v1 keeps
    the last one only; both give the shared cells instance 1's class."""
    boxes = torch.tensor([[0.0, 0, 60, 60], [4.0, 4, 64, 64]])
    centers = torch.tensor([[24.0, 24.0], [40.0, 40.0]])
    args = (boxes, centers, torch.tensor([3, 7]), torch.tensor([0, 0]), 1, (64, 64), [4])
    kw = dict(scale_ranges=[(1, 96)], sigma=1.0, num_classes=10)
    labels_v2, pos_v2 = assign_grid_targets(*args, **kw)
    labels_v1, pos_v1 = assign_grid_targets(*args, **kw, last_instance_wins=True)
    assert torch.equal(labels_v1[0], labels_v2[0])
    shared = {5, 6, 9, 10}
    assert len(pos_v2[0]) == 18
    assert len(pos_v1[0]) == 14 and len({c for c in pos_v1[0][:, 1].tolist()}) == 14
    for img, cell, inst in pos_v1[0].tolist():
        expected = 1 if cell in shared or cell in {7, 11, 13, 14, 15} else 0
        assert (img, inst) == (0, expected)
        assert labels_v1[0][0].flatten()[cell] == (7 if expected else 3)
    assert pos_v1[0][:, 1].tolist() == sorted(pos_v1[0][:, 1].tolist())  # row-major


def test_mask_target_strides_per_variant():
    assert mask_target_strides(family_cfg("SOLOv2InstanceHead")) == [4] * 5
    for head in HEADS[1:]:
        assert mask_target_strides(family_cfg(head)) == [4, 4, 8, 16, 16]


def test_extra_mask_targets_fields_match_imrescale():
    masks = torch.zeros(2, 70, 90, dtype=torch.bool)
    masks[0, 5:40, 10:50] = True
    masks[1, 30:70, 40:90] = True
    out = extra_mask_targets(masks, 4, [4, 4, 8, 16, 16])
    assert set(out) == {"gt_masks_small_s8", "gt_masks_small_s16"}
    assert mask_target_field(4, 4) == "gt_masks_small"
    for s in (8, 16):
        expected = rescale_masks(masks.numpy(), s)
        assert out[f"gt_masks_small_s{s}"].shape == (2, int(70 / s + 0.5), int(90 / s + 0.5))
        assert np.array_equal(out[f"gt_masks_small_s{s}"].numpy(), expected)


def test_mapper_adds_the_coarser_masks_for_solo_v1(tmp_path):
    import cv2

    cfg = family_cfg("SOLOInstanceHead")
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (70,), 1000
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((70, 90, 3), np.uint8))
    poly = [10.0, 5.0, 50.0, 5.0, 50.0, 40.0, 10.0, 40.0]
    d = {
        "file_name": str(tmp_path / "a.png"), "height": 70, "width": 90, "image_id": 1,
        "annotations": [{"bbox": [10, 5, 40, 35], "bbox_mode": 1, "segmentation": [poly],
                         "category_id": 1}],
    }  # fmt: skip
    inst = SOLODatasetMapper(cfg, is_train=True)(d)["instances"]
    assert inst.gt_masks_small.shape == (1, 18, 23)  # int(70/4 + .5), int(90/4 + .5)
    assert inst.gt_masks_small_s8.shape == (1, 9, 11)
    assert inst.gt_masks_small_s16.shape == (1, 4, 6)
    v2 = SOLODatasetMapper(family_cfg("SOLOv2InstanceHead"), is_train=True)
    assert not v2(copy.deepcopy(d))["instances"].has("gt_masks_small_s8")


@pytest.mark.parametrize("head", HEADS[1:])
def test_loss_uses_targets_at_half_the_level_stride(head):
    """Recompute the dice loss by hand: each level's positives against the full-resolution mask
    rescaled by 1/(stride/2) with imrescale, pasted top-left in that level's canvas. The object
    (40x40) is positive on levels 1 (stride 8 -> targets at 4) and 2 (16 -> 8)."""
    torch.manual_seed(0)
    cfg = family_cfg(head)
    model = build_model(cfg)
    x = family_input(cfg, 70, 90, [(20, 10, 60, 50)], [1])
    full = torch.zeros(1, 70, 90, dtype=torch.bool)
    full[0, 10:50, 20:60] = True
    model.train()
    with EventStorage():
        losses = model([x])
        images = model.preprocess_image([x])
        cate, preds, _ = model.predict(images.tensor)
    hc, wc = images.tensor.shape[-2:]  # 96 x 96
    _, positives = assign_grid_targets(
        x["instances"].gt_boxes.tensor, x["instances"].gt_centers, x["instances"].gt_classes,
        torch.zeros(1, dtype=torch.int64), 1, (hc, wc), model.ins_head.num_grids,
        model.criterion.scale_ranges, model.criterion.sigma, 3, last_instance_wins=True,
    )  # fmt: skip
    assert [len(p) > 0 for p in positives] == [False, True, True, False, False]
    dice = []
    for level, stride in ((1, 4), (2, 8)):
        small = torch.from_numpy(rescale_masks(full.numpy(), stride))[0]
        canvas = torch.zeros(hc // stride, wc // stride)
        canvas[: small.shape[0], : small.shape[1]] = small
        probs = model.ins_head.positive_masks(preds[level], None, positives[level][:, 0],
                                              positives[level][:, 1])  # fmt: skip
        assert probs.shape[-2:] == canvas.shape
        dice.append(dice_loss(probs.flatten(1), canvas.flatten().expand(len(probs), -1)))
    expected = 3.0 * torch.cat(dice).mean()
    torch.testing.assert_close(losses["loss_mask"], expected)


def test_missing_coarse_mask_field_is_a_clear_error():
    cfg = family_cfg("SOLOInstanceHead")
    model = build_model(cfg)
    x = make_input(96, 96, [(10, 10, 70, 70)], [0])  # stride-4 masks only
    with pytest.raises(ValueError, match="gt_masks_small_s8"):
        train_step(model, [x])


# --------------------------------------------------------------------------------------------
# tiny models of every head, end to end
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=HEADS)
def head_model(request):
    torch.manual_seed(0)
    cfg = family_cfg(request.param)
    return cfg, build_model(cfg)


def test_train_step_mixed_sizes_empty_image_and_every_parameter_gets_a_gradient(head_model):
    cfg, model = head_model
    inputs = [
        family_input(cfg, 96, 128, [(10, 10, 50, 40), (30, 20, 90, 90)], [0, 2]),
        family_input(cfg, 64, 80),  # no annotations
        family_input(cfg, 70, 64, [(2, 3, 9, 11)], [1], seed=1),
    ]
    losses = train_step(model, inputs)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [
        n for n, g in grads.items() if g is None
    ]


def test_batch_without_positives_keeps_every_output_in_the_graph(head_model):
    cfg, model = head_model
    losses = train_step(model, [family_input(cfg, 64, 64), family_input(cfg, 96, 64)])
    assert losses["loss_mask"].item() == 0 and losses["loss_mask"].requires_grad
    head_params = [p for n, p in model.ins_head.named_parameters() if not n.startswith("cate")]
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in head_params)


def assert_same_detections(reference, got, what):
    """Pair detections by class, mask IoU and score (order-independent among near-ties)."""
    agreement = compare_detections(reference, got.scores, got.pred_classes, got.pred_masks)
    assert agreement.ok, f"{what}: {agreement}"


@pytest.mark.parametrize("head", HEADS)
def test_inference_contract_and_batching_invariance(head):
    m = confident_tiny_model(head)
    inputs = [make_input(96, 128, seed=1), make_input(64, 64, seed=2), make_input(90, 120, seed=3)]
    strip = [{k: x[k] for k in ("image", "height", "width")} for x in inputs]
    with torch.no_grad():
        batched = [r["instances"] for r in m(strip)]
        alone = [m([x])[0]["instances"] for x in strip]
    for x, b, a in zip(inputs, batched, alone):
        assert 0 < len(b) <= 100 and b.image_size == (x["height"], x["width"])
        assert b.pred_masks.dtype == torch.bool and b.pred_classes.dtype == torch.int64
        assert torch.all(b.scores[:-1] >= b.scores[1:])
        assert_same_detections(a, b, f"{head} batched vs alone")


@pytest.mark.parametrize("head", HEADS)
def test_inference_chunk_size_invariance(head):
    m = confident_tiny_model(head)
    x = [{k: v for k, v in make_input(96, 96, seed=4).items() if k != "instances"}]
    with torch.no_grad():
        m.inference_args["chunk_size"] = 37
        small = m(x)[0]["instances"]
        m.inference_args["chunk_size"] = 100000
        whole = m(x)[0]["instances"]
    assert len(whole) > 0
    assert_same_detections(whole, small, f"{head} chunks of 37 vs one chunk")


@pytest.mark.parametrize("head", ["SOLOInstanceHead", "DecoupledSOLOLightInstanceHead"])
def test_losses_decrease_when_overfitting_one_batch(head):
    """AdamW, because the reference initialisation (mask outputs at probability 0.01, so
    Decoupled products at 1e-4) makes the dice gradients tiny at first: SGD at lr 0.01 takes
    hundreds of steps to move the mask loss, as in the original recipe's first iterations."""
    torch.manual_seed(0)
    cfg = family_cfg(head)
    cfg.MODEL.RESNETS.NORM = "BN"
    model = build_model(cfg)
    inputs = [family_input(cfg, 96, 96, [(8, 8, 56, 56), (40, 50, 90, 92)], [0, 1])]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(20):
        losses = train_step(model, inputs)
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    assert history[-1]["loss_cls"] < 0.2 * history[0]["loss_cls"]
    assert history[-1]["loss_mask"] < history[0]["loss_mask"] - 0.1


# --------------------------------------------------------------------------------------------
# DCN placement, config errors
# --------------------------------------------------------------------------------------------


def test_tower_dcn_last_conv_only_with_official_key_layout():
    cfg = family_cfg("DecoupledSOLOLightInstanceHead", TOWER_DCN="DCN", TOWER_DCN_CONVS="last")
    cfg.MODEL.SOLO.NUM_INSTANCE_CONVS = 3
    sd = build_model(cfg).state_dict()
    offsets = sorted(k for k in sd if "conv_offset" in k)
    assert offsets == [
        f"ins_head.{t}.6.conv_offset.{p}"
        for t in ("cate_tower", "mask_tower")
        for p in ("bias", "weight")
    ]
    assert sd["ins_head.mask_tower.6.conv_offset.weight"].shape == (18, 32, 3, 3)


def test_solov2_dcn_everywhere():
    cfg = family_cfg("SOLOv2InstanceHead", TOWER_DCN="DCNv2", MASK_DCN="DCNv2")
    model = build_model(cfg)
    packs = {n for n, m in model.named_modules() if isinstance(m, DeformConvPack)}
    assert {"ins_head.kernel_tower.0", "ins_head.cate_tower.3", "mask_head.conv_pred.0"} <= packs
    assert len(packs) == 2 * 2 + (1 + 1 + 2 + 3) + 1  # towers, mask-feature convs, conv_pred
    assert model.state_dict()["mask_head.conv_pred.0.conv_offset.weight"].shape == (3, 32, 1, 1)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("HEAD", "SOLOv3Head", "MODEL.SOLO.HEAD"),
        ("TOWER_DCN", "DCNv3", "MODEL.SOLO.TOWER_DCN"),
        ("TOWER_DCN_CONVS", "first", "TOWER_DCN_CONVS"),
        ("MASK_DCN", "deform", "MODEL.SOLO.MASK_DCN"),
    ],
)
def test_bad_family_config_values_raise_clear_errors(key, value, match):
    cfg = family_cfg("SOLOv2InstanceHead")
    cfg.MODEL.SOLO[key] = value
    with pytest.raises(ValueError, match=match):
        build_model(cfg)


# --------------------------------------------------------------------------------------------
# a user's head: a subclass registered under its own name exports with no change to solo_d2
# --------------------------------------------------------------------------------------------

SHIPPED_HEADS = {
    "SOLOv2InstanceHead": SOLOv2InstanceHead,
    "SOLOInstanceHead": SOLOInstanceHead,
    "DecoupledSOLOInstanceHead": DecoupledSOLOInstanceHead,
    "DecoupledSOLOLightInstanceHead": DecoupledSOLOLightInstanceHead,
}


def user_head(base_name: str) -> str:
    """Register ``My<base>``, a subclass of a shipped head that changes nothing, as a user would."""
    name = f"My{base_name}"
    if name not in SOLO_HEAD_REGISTRY:
        SOLO_HEAD_REGISTRY.register(type(name, (SHIPPED_HEADS[base_name],), {}))
    return name


@pytest.mark.parametrize("base", HEADS)
def test_user_registered_head_subclass_exports(base, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")  # noqa: F841 (the runner needs it)
    from solo_d2.export import SOLOExportable, export_onnx, export_torchscript
    from solo_d2.export.runtime import ONNXRuntimeModel

    model = confident_tiny_model(user_head(base))
    assert type(model.ins_head).__name__ == f"My{base}"
    image = make_input(96, 128, seed=1)["image"].float()
    with torch.no_grad():
        ref = model([{"image": image}])[0]["instances"]
    assert len(ref) > 0
    traced = export_torchscript(SOLOExportable(model), image, tmp_path / "m.ts")
    export_onnx(SOLOExportable(model), image, tmp_path / "m.onnx")
    with torch.no_grad():
        ts_out = traced(image)
    onnx_out = ONNXRuntimeModel(tmp_path / "m.onnx").run(image)
    for what, (scores, classes, masks) in {
        "torchscript": ts_out,
        "onnx": (onnx_out["scores"], onnx_out["classes"], onnx_out["masks"]),
    }.items():
        agreement = compare_detections(ref, scores, classes, masks)
        assert agreement.ok, f"{base} subclass, {what}: {agreement}"
