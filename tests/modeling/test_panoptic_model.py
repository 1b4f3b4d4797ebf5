"""The panoptic parts of the model (solo_d2/modeling/panoptic.py): the merge of things and stuff
(hand-checked cases and detectron2's Panoptic FPN merge as the reference), the semantic loss, and
the stuff branch with every head variant."""

import math

import pytest
import torch
from conftest import confident_tiny_model, make_input, tiny_cfg
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.panoptic_fpn import combine_semantic_and_instance_outputs
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

from solo_d2.modeling.panoptic import combine_things_and_stuff, semantic_loss

pytestmark = pytest.mark.usefixtures("one_thread")

MERGE = dict(overlap_threshold=0.5, stuff_area_limit=4, score_threshold=0.5)


def _instances(masks, scores, classes) -> Instances:
    masks = torch.as_tensor(masks, dtype=torch.bool)
    inst = Instances(tuple(masks.shape[-2:]))
    inst.pred_masks = masks
    inst.scores = torch.as_tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.as_tensor(classes, dtype=torch.int64)
    return inst


def _box(h, w, y0, y1, x0, x1):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_merge_overlap_score_and_stuff_area_by_hand():
    h, w = 8, 8
    a = _box(h, w, 0, 4, 0, 4)  # 16 px, score 0.9
    b = _box(h, w, 2, 6, 2, 6)  # 16 px, 4 of them under a: 25% overlap -> kept, 12 px visible
    c = _box(h, w, 0, 4, 1, 4)  # 12 px, all under a: 100% overlap -> dropped
    d = _box(h, w, 6, 8, 6, 8)  # score 0.4 < 0.5 -> never pasted
    inst = _instances(torch.stack([b, a, c, d]), [0.8, 0.9, 0.7, 0.4], [1, 0, 2, 3])
    stuff = torch.zeros(h, w, dtype=torch.int64)  # "things" everywhere...
    stuff[6:, :] = 1  # ...but stuff 1 on rows 6-7 (no instance there but d, never pasted)
    stuff[:, 7] = 2  # and stuff 2 on column 7 (8 px, none taken)
    stuff[0, 6] = 3  # stuff 3: one pixel, < 4 -> no segment
    seg, info = combine_things_and_stuff(inst, stuff, **MERGE)
    assert [(s["id"], s["isthing"], s["category_id"]) for s in info] == [
        (1, True, 0),
        (2, True, 1),
        (3, False, 1),
        (4, False, 2),
    ]
    assert info[0]["score"] == pytest.approx(0.9) and info[0]["instance_id"] == 1
    assert info[1]["instance_id"] == 0 and info[1]["area"] == 12
    assert info[2]["area"] == 14 and info[3]["area"] == 8  # rows 6-7 but column 7; column 7
    assert (seg[a] == 1).all()
    assert (seg[b & ~a] == 2).all()
    assert (seg[6:, :7] == 3).all() and (seg[:, 7] == 4).all()
    assert seg[0, 6] == 0 and seg[5, 0] == 0  # stuff 3 too small; "things" class never pasted
    assert seg.dtype == torch.int32
    for s in info:
        assert int((seg == s["id"]).sum()) == s["area"]


def test_merge_thresholds_are_inclusive_as_panoptic_fpn():
    h, w = 4, 4
    a = _box(h, w, 0, 2, 0, 4)  # 8 px
    b = _box(h, w, 1, 3, 0, 4)  # 8 px, 4 under a: overlap exactly 0.5 -> kept (not > 0.5)
    inst = _instances(torch.stack([a, b]), [0.5, 0.5], [0, 0])  # scores exactly at 0.5: kept
    stuff = torch.ones(h, w, dtype=torch.int64)  # 4 px left, exactly the area limit: kept
    seg, info = combine_things_and_stuff(inst, stuff, **MERGE)
    assert [s["isthing"] for s in info] == [True, True, False]
    assert [s["area"] for s in info] == [8, 4, 4]


def test_merge_without_instances_or_stuff():
    inst = _instances(torch.zeros(0, 5, 6), [], [])
    seg, info = combine_things_and_stuff(inst, torch.zeros(5, 6, dtype=torch.int64), **MERGE)
    assert info == [] and (seg == 0).all() and seg.shape == (5, 6)
    seg, info = combine_things_and_stuff(inst, torch.full((5, 6), 2), **MERGE)
    assert [(s["id"], s["category_id"], s["area"]) for s in info] == [(1, 2, 30)]


@pytest.mark.parametrize("seed", range(5))
def test_merge_equals_detectron2_panoptic_fpn(seed):
    """detectron2's Panoptic FPN merge (a per-instance loop) is the reference: same segment map,
    same segments, on random overlapping instances and stuff."""
    g = torch.Generator().manual_seed(seed)
    h, w, n = 40, 50, 12
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for m in masks:
        y0, x0 = (
            torch.randint(0, h - 5, (1,), generator=g).item(),
            torch.randint(0, w - 5, (1,), generator=g).item(),
        )
        dy, dx = torch.randint(3, 20, (2,), generator=g).tolist()
        m[y0 : y0 + dy, x0 : x0 + dx] = True
    masks[3] = False  # an empty mask
    scores = torch.rand(n, generator=g)  # distinct with probability 1: same order in both
    inst = _instances(masks, scores, torch.randint(0, 5, (n,), generator=g))
    stuff = torch.randint(0, 4, (h // 10, w // 10), generator=g)
    stuff = stuff.repeat_interleave(10, 0).repeat_interleave(10, 1)  # blocks of 100 px
    args = dict(overlap_threshold=0.3, stuff_area_limit=60, score_threshold=0.2)
    seg, info = combine_things_and_stuff(inst, stuff, **args)
    ref_seg, ref_info = combine_semantic_and_instance_outputs(inst, stuff, *args.values())
    assert torch.equal(seg, ref_seg)
    keys = ("id", "isthing", "category_id", "instance_id")
    assert [{k: s[k] for k in keys if k in s} for s in info] == [
        {k: s[k] for k in keys if k in s} for s in ref_info
    ]
    assert any(s["isthing"] for s in info) and any(not s["isthing"] for s in info)


def test_semantic_loss_by_hand():
    # two classes, logits (0, log 3): p(class 1) = 3/4 everywhere
    logits = torch.zeros(1, 2, 1, 2)
    logits[:, 1] = math.log(3)
    targets = torch.tensor([[[1, 1, 0, 0], [255, 255, 255, 255]]])  # 4 px labelled, upsampled x2
    expected = (2 * -math.log(3 / 4) + 2 * -math.log(1 / 4)) / 4
    assert semantic_loss(logits, targets, 255).item() == pytest.approx(expected, rel=1e-5)
    # nothing labelled: 0, still differentiable
    logits.requires_grad_(True)
    loss = semantic_loss(logits, torch.full((1, 2, 4), 255), 255)
    loss.backward()
    assert loss.item() == 0 and logits.grad is not None


def _panoptic_cfg(head: str):
    cfg = tiny_cfg()
    cfg.defrost()
    cfg.MODEL.SOLO.HEAD = head
    cfg.MODEL.META_ARCHITECTURE = "PanopticSOLO"
    cfg.MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES = 2
    cfg.MODEL.SOLO.PANOPTIC.CHANNELS = 32
    cfg.MODEL.SOLO.PANOPTIC.STUFF_AREA_LIMIT = 1
    return cfg


@pytest.mark.parametrize(
    "head",
    [
        "SOLOv2InstanceHead",
        "SOLOInstanceHead",
        "DecoupledSOLOInstanceHead",
        "DecoupledSOLOLightInstanceHead",
    ],
)
def test_every_variant_trains_and_segments_stuff(head):
    torch.manual_seed(0)
    model = build_model(_panoptic_cfg(head))
    assert model.stuff_head is not None
    x = make_input(64, 96)  # no instance: the stuff branch alone carries the test
    x["sem_seg"] = torch.cat([torch.ones(32, 96), torch.full((32, 96), 2)]).long()
    with EventStorage():
        losses = model([x])
    assert set(losses) == {"loss_cls", "loss_mask", "loss_sem_seg"}
    # 3 classes at initialisation (zero classifier bias, tiny weights): about 0.5 * log(3)
    assert losses["loss_sem_seg"].item() == pytest.approx(0.5 * math.log(3), rel=0.05)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.stuff_head.parameters())

    # the stuff classifier made to predict class 1 everywhere, far from any tie
    with torch.no_grad():
        model.stuff_head.predictor.weight.zero_()
        model.stuff_head.predictor.bias.copy_(torch.tensor([-5.0, 5.0, -5.0]))
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": x["image"], "height": 32, "width": 48}])
    assert out["sem_seg"].shape == (3, 32, 48)
    seg, info = out["panoptic_seg"]
    assert seg.shape == (32, 48) and seg.dtype == torch.int32
    things_px = sum(s["area"] for s in info if s["isthing"])
    stuff = [s for s in info if not s["isthing"]]
    assert [(s["category_id"], s["area"]) for s in stuff] == [(1, 32 * 48 - things_px)]
    assert int(seg.eq(0).sum()) == 0


def test_panoptic_model_refuses_inputs_without_semantic_targets():
    model = build_model(_panoptic_cfg("SOLOv2InstanceHead"))
    with EventStorage(), pytest.raises(ValueError, match="needs 'sem_seg'.*NAME=panoptic:"):
        model([make_input(64, 96)])


def test_stuff_branch_features_are_checked():
    cfg = _panoptic_cfg("SOLOv2InstanceHead")
    cfg.MODEL.SOLO.PANOPTIC.IN_FEATURES = ["p2", "p9"]
    with pytest.raises(ValueError, match=r"MODEL.SOLO.PANOPTIC.IN_FEATURES names \['p9'\]"):
        build_model(cfg)


def test_export_of_a_panoptic_model_gives_its_instances(caplog):
    from solo_d2.export import SOLOExportable

    model = confident_tiny_model(
        **{
            "MODEL.META_ARCHITECTURE": "PanopticSOLO",
            "MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES": 2,
            "MODEL.SOLO.PANOPTIC.CHANNELS": 32,
        }
    )
    with caplog.at_level("WARNING"):
        wrapper = SOLOExportable(model)
    assert "its outputs sem_seg, panoptic_seg are not part of the exported graph" in caplog.text
    image = make_input(96, 128)["image"].float()
    with torch.no_grad():
        scores, classes, masks = wrapper(image)
        (out,) = model([{"image": image}])
    assert len(scores) == len(out["instances"]) > 0
    assert torch.allclose(scores, out["instances"].scores, atol=1e-5)
