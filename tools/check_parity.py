#!/usr/bin/env python3
"""Check this project's SOLOv2 against a parity fixture of AdelaiDet's outputs.

    python tools/check_parity.py FIXTURE.pt [--device cpu]

The fixture format is documented in shared/parity/README.md: an AdelaiDet config and checkpoint,
inference cases (model input, AdelaiDet's scores, classes and RLE masks) and a training batch with
AdelaiDet's losses. Prints one line per case and exits 0 only when every tolerance holds:
scores within 1e-3, identical classes in the same order, every mask IoU >= 0.99, losses within
1e-3 relative.
"""

import argparse
import sys
import tempfile

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from solo_d2 import add_solo_config
from solo_d2.adelaidet import apply_adelaidet_solov2_config
from solo_d2.modeling.targets import instance_targets

SCORE_TOL, MIN_IOU, LOSS_RTOL = 1e-3, 0.99, 1e-3


def build_cfg(fixture):
    c = fixture["config"]
    cfg = get_cfg()
    add_solo_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "SOLOv2"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.DEPTH = c["resnets"]["depth"]
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = c["resnets"]["res2_out_channels"]
    cfg.MODEL.FPN.OUT_CHANNELS = c["fpn_out_channels"]
    cfg.MODEL.PIXEL_MEAN = list(c["pixel_mean"])
    cfg.MODEL.PIXEL_STD = list(c["pixel_std"])
    apply_adelaidet_solov2_config(cfg, c["solov2"])
    return cfg


def load_model(fixture, device):
    cfg = build_cfg(fixture)
    cfg.MODEL.DEVICE = device
    model = build_model(cfg)
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in fixture["checkpoint"]["model"].items()
    }
    with tempfile.NamedTemporaryFile(suffix=".pth") as f:
        torch.save({"model": state}, f.name)
        DetectionCheckpointer(model).load(f.name)
    own = set(model.state_dict())
    return model, (sorted(own - set(state)), sorted(set(state) - own))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def check_inference(model, case, index):
    model.eval()
    with torch.no_grad():
        out = model([{"image": case["image"], "height": case["height"], "width": case["width"]}])
    inst = out[0]["instances"].to("cpu")
    ref_scores, ref_classes = case["scores"].float(), case["pred_classes"].long()
    problems = []
    if len(inst) != len(ref_scores):
        problems.append(f"{len(inst)} instances, reference {len(ref_scores)}")
        n = min(len(inst), len(ref_scores))
    else:
        n = len(inst)
    score_err = (inst.scores[:n] - ref_scores[:n]).abs().max().item() if n else 0.0
    same_classes = bool(torch.equal(inst.pred_classes[:n], ref_classes[:n]))
    ref_masks = mask_util.decode(case["pred_masks_rle"][:n]) if n else np.zeros((0, 0, 0))
    ious = [mask_iou(inst.pred_masks[i].numpy(), ref_masks[:, :, i].astype(bool)) for i in range(n)]
    min_iou = min(ious) if ious else 1.0
    if score_err > SCORE_TOL:
        problems.append(f"max score error {score_err:.2e} > {SCORE_TOL}")
    if not same_classes:
        problems.append("classes differ")
    if min_iou < MIN_IOU:
        problems.append(f"min mask IoU {min_iou:.4f} < {MIN_IOU}")
    h, w = case["image"].shape[-2:]
    line = (
        f"inference case {index} ({h}x{w} -> {case['height']}x{case['width']}): "
        f"{len(inst)} instances, max |dscore| {score_err:.2e}, classes "
        f"{'identical' if same_classes else 'DIFFER'}, min mask IoU {min_iou:.4f}"
    )
    return line, problems


def batch_to_inputs(batch, mask_stride):
    inputs = []
    for item in batch:
        valid, centers, small = instance_targets(item["gt_masks"], mask_stride)
        inst = Instances(tuple(item["image"].shape[-2:]))
        inst.gt_boxes = Boxes(item["gt_boxes"][valid].float())
        inst.gt_classes = item["gt_classes"][valid].long()
        inst.gt_centers = centers[valid]
        inst.gt_masks_small = small[valid]
        inputs.append({"image": item["image"], "instances": inst})
    return inputs


def check_training(model, train):
    model.train()
    with EventStorage():
        losses = model(batch_to_inputs(train["batch"], model.mask_stride))
    ref = train["losses"]
    pairs = {"loss_cls": ref["loss_cate"], "loss_mask": ref["loss_ins"]}
    problems, parts = [], []
    for name, ref_value in pairs.items():
        value = losses[name].item()
        rel = abs(value - float(ref_value)) / max(abs(float(ref_value)), 1e-12)
        parts.append(f"{name} {value:.6f} (reference {float(ref_value):.6f}, rel {rel:.1e})")
        if rel > LOSS_RTOL:
            problems.append(f"{name} relative error {rel:.2e} > {LOSS_RTOL}")
    sizes = ", ".join("x".join(map(str, b["image"].shape[-2:])) for b in train["batch"])
    return f"training batch ({sizes}): " + "; ".join(parts), problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("fixture", help="parity fixture .pt file")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        fixture = torch.load(args.fixture, weights_only=True)
    except (OSError, RuntimeError) as e:
        sys.exit(f"check_parity: cannot load fixture {args.fixture}: {e}")
    model, incompatible = load_model(fixture, args.device)
    failures = 0
    missing, unexpected = incompatible
    load_line = (
        f"checkpoint: {len(fixture['checkpoint']['model'])} tensors loaded, missing {missing}, "
        f"unexpected {unexpected}"
    )
    load_ok = not missing and not unexpected
    print(("PASS " if load_ok else "FAIL ") + load_line)
    failures += not load_ok
    cases = [check_inference(model, c, i) for i, c in enumerate(fixture["inference"])]
    if "train" in fixture:
        cases.append(check_training(model, fixture["train"]))
    for line, problems in cases:
        print(
            ("PASS " if not problems else "FAIL ")
            + line
            + ("" if not problems else " -- " + "; ".join(problems))
        )
        failures += bool(problems)
    total = len(cases) + 1
    print(f"{'OK' if not failures else 'FAILED'}: {total - failures}/{total} checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
