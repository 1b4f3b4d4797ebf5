"""Shared test helpers: a tiny SOLOv2 config and synthetic inputs, all on CPU."""

from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances

from solo_d2 import add_solo_config
from solo_d2.modeling.targets import instance_targets

REPO = Path(__file__).resolve().parent.parent
PARITY_FIXTURE = REPO.parent / "shared" / "parity" / "solov2_adelaidet_r18_public.pt"


def tiny_cfg():
    """A SOLOv2 with an R18-FPN of 32 channels and small heads: fast on CPU."""
    cfg = get_cfg()
    add_solo_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "Base-SOLOv2.yaml"))
    cfg.merge_from_list(
        [
            "MODEL.DEVICE", "cpu",
            "MODEL.WEIGHTS", "",
            "MODEL.RESNETS.DEPTH", 18,
            "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
            "MODEL.FPN.OUT_CHANNELS", 32,
            "MODEL.SOLO.NUM_CLASSES", 3,
            "MODEL.SOLO.INSTANCE_IN_CHANNELS", 32,
            "MODEL.SOLO.INSTANCE_CHANNELS", 32,
            "MODEL.SOLO.NUM_INSTANCE_CONVS", 2,
            "MODEL.SOLO.NUM_KERNELS", 32,
            "MODEL.SOLO.MASK_IN_CHANNELS", 32,
            "MODEL.SOLO.MASK_CHANNELS", 32,
            "MODEL.SOLO.FPN_SCALE_RANGES", [[1, 32], [16, 64], [32, 128], [64, 256], [128, 2048]],
            "MODEL.SOLO.NUM_GRIDS", [12, 10, 8, 6, 4],
        ]
    )  # fmt: skip
    return cfg


def make_input(h, w, boxes=(), classes=(), seed=0):
    """A training input dict with rectangle instances (masks = boxes), as the mapper makes it."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    masks = torch.zeros((len(boxes), h, w), dtype=torch.bool)
    for m, (x1, y1, x2, y2) in zip(masks, boxes):
        m[y1:y2, x1:x2] = True
    valid, centers, small = instance_targets(masks, 4)
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    inst.gt_centers = centers
    inst.gt_masks_small = small
    return {"image": image, "instances": inst[valid], "height": h, "width": w}


@pytest.fixture
def parity_fixture_path():
    if not PARITY_FIXTURE.exists():
        pytest.skip(
            f"parity fixture {PARITY_FIXTURE} not found (it lives in ../shared/, beside CI's clone)"
        )
    return PARITY_FIXTURE
