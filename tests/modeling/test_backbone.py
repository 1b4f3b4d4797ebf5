"""``build_solo_resnet_fpn_backbone`` for ResNet-18/34: detectron2's R18 at 64 channels, a
narrower R18 (the quickstart's from-scratch backbone), and clear errors for what R18 lacks."""

import pytest
import torch
from conftest import solo_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

from solo_d2.modeling.backbone import build_solo_resnet_fpn_backbone


def _r18_cfg(width: int):
    return solo_cfg(
        opts=[
            "MODEL.RESNETS.DEPTH", 18,
            "MODEL.RESNETS.STEM_OUT_CHANNELS", width,
            "MODEL.RESNETS.RES2_OUT_CHANNELS", width,
            "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
            "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"],
            "MODEL.FPN.OUT_CHANNELS", 16,
        ]
    )  # fmt: skip


def test_r18_at_64_channels_is_detectron2_r18():
    cfg = _r18_cfg(64)
    ours = build_solo_resnet_fpn_backbone(cfg, ShapeSpec(channels=3)).state_dict()
    theirs = build_resnet_fpn_backbone(cfg, ShapeSpec(channels=3)).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_narrow_r18_widths_and_forward():
    """Stage widths double from RES2_OUT_CHANNELS (32 -> 32/64/128/256); res2's first block
    needs no projection (stem and res2 both 32 wide); P2-P6 have the FPN width."""
    torch.manual_seed(0)
    backbone = build_solo_resnet_fpn_backbone(_r18_cfg(32), ShapeSpec(channels=3))
    widths = {k: v.channels for k, v in backbone.bottom_up.output_shape().items()}
    assert widths == {"res2": 32, "res3": 64, "res4": 128, "res5": 256}
    assert backbone.bottom_up.res2[0].shortcut is None
    assert backbone.bottom_up.res3[0].shortcut is not None
    out = backbone(torch.randn(2, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p2": (2, 16, 16, 24),
        "p3": (2, 16, 8, 12),
        "p4": (2, 16, 4, 6),
        "p5": (2, 16, 2, 3),
        "p6": (2, 16, 1, 2),
    }
    full = sum(
        p.numel()
        for p in build_resnet_fpn_backbone(_r18_cfg(64), ShapeSpec(3)).bottom_up.parameters()
    )
    narrow = sum(p.numel() for p in backbone.bottom_up.parameters())
    assert narrow < full / 3.5  # about a quarter of the weights (and of the multiply-adds)


def test_narrow_stem_into_wider_res2_gets_a_projection():
    cfg = _r18_cfg(32)
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 48
    backbone = build_solo_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))
    assert backbone.bottom_up.res2[0].shortcut is not None
    assert backbone(torch.randn(1, 3, 32, 32))["p2"].shape == (1, 16, 8, 8)


@pytest.mark.parametrize(
    "key, value",
    [
        ("DEFORM_ON_PER_STAGE", [False, True, False, False]),
        ("RES5_DILATION", 2),
        ("NUM_GROUPS", 2),
    ],
)
def test_r18_refuses_what_basic_blocks_cannot_do(key, value):
    cfg = _r18_cfg(32)
    setattr(cfg.MODEL.RESNETS, key, value)
    with pytest.raises(ValueError, match=r"R18/R34 need MODEL\.RESNETS\."):
        build_solo_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))
