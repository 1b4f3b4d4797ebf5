#!/usr/bin/env python3
"""Draw what a SOLO-family model computes on one image (docs/visualization.md).

    python tools/visualize_features.py --config-file configs/SOLOv2_R18_quickstart_shapes.yaml \
        --input datasets/shapes/val/000000.png --output output/features \
        --opts MODEL.WEIGHTS output/quickstart/model_final.pth

Writes into --output (default output/features/): the mask-feature channels (SOLOv2 heads:
mask_features.png; SOLO v1: level_masks.png; Decoupled SOLO: decoupled_xy.png), the category
grids of every level (category_grids.png), one instance_NN.png per kept instance (its grid cell's
soft mask beside its final mask, up to --max-instances) and summary.json. The image is resized by
the config's test size first, as the model sees it at inference.

Without MODEL.WEIGHTS the heads are random (a warning says so). Exit status: 0 on success, 2 on
bad arguments, config, image or weights (one "error: ..." line).
"""

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

import detectron2.data.transforms as T
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog

from solo_d2.atomic_io import atomic_write_json
from solo_d2.config import ConfigError, load_config
from solo_d2.data.images import read_image
from solo_d2.data.shapes import register_shapes
from solo_d2.engine import WeightsUnavailableError, load_model
from solo_d2.model_zoo import resolve_config_file
from solo_d2.visualization.features import MAX_INSTANCES, write_feature_pictures

DEFAULT_OUTPUT = "output/features"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add(
        "--config-file",
        required=True,
        metavar="FILE",
        help="model config: a file or a model zoo name",
    )
    add("--input", required=True, metavar="IMAGE", help="one image file")
    add(
        "--output",
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help=f"folder to write the pictures to, created if needed (default {DEFAULT_OUTPUT})",
    )
    add(
        "--max-instances",
        type=int,
        default=MAX_INSTANCES,
        metavar="N",
        help=f"instance pictures written at most, best scores first (default {MAX_INSTANCES})",
    )
    add(
        "--tile",
        type=int,
        default=96,
        metavar="PX",
        help="longest side of one channel tile in pixels (default 96)",
    )
    add(
        "--panel",
        type=int,
        default=320,
        metavar="PX",
        help="longest side of one level's category-grid panel in pixels (default 320)",
    )
    add(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth",
    )
    return parser  # fmt: skip


def warn_untrained(cfg: CfgNode) -> None:
    """Warn when MODEL.WEIGHTS holds no trained model (none, or an ImageNet backbone)."""
    weights = cfg.MODEL.WEIGHTS
    if not weights or "ImageNetPretrained" in weights:
        print(
            f"warning: MODEL.WEIGHTS={weights!r} is no trained model: the heads are randomly "
            "initialised, the pictures show an untrained model (pass one with --opts "
            "MODEL.WEIGHTS model.pth)",
            file=sys.stderr,
        )


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.max_instances < 0:
        parser.error("--max-instances must be at least 0")
    if args.tile < 8 or args.panel < 32:
        parser.error("--tile must be at least 8 and --panel at least 32 pixels")
    if len(args.opts) % 2:
        parser.error(f"--opts needs KEY VALUE pairs, got {args.opts}")
    register_shapes()  # class names and colours of the shapes configs
    try:
        args.config_file = resolve_config_file(args.config_file)  # a file, else a zoo name
        cfg = load_config(args.config_file, args.opts)  # ConfigError: one line on a mistake
        if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
            print("warning: CUDA is not available, running on the CPU", file=sys.stderr)
            cfg.MODEL.DEVICE = "cpu"
        image = read_image(args.input, cfg.INPUT.FORMAT, cfg.INPUT.MAX_IMAGE_PIXELS)
        warn_untrained(cfg)
        model, cfg = load_model(cfg)
    except (ConfigError, ValueError, OSError, WeightsUnavailableError) as e:
        # BadImageError and BadWeightsError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    resize = T.ResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
    )
    image = resize.get_transform(image).apply_image(image)
    meta = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if len(cfg.DATASETS.TEST) else None
    names = (meta.get("thing_classes", None) if meta else None) or []
    colors = (meta.get("thing_colors", None) if meta else None) or None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    summary = write_feature_pictures(
        model, image, str(out), input_format=cfg.INPUT.FORMAT, class_names=names,
        colors=colors, max_instances=args.max_instances, tile=args.tile, panel=args.panel,
    )  # fmt: skip
    summary = {"input": str(Path(args.input).resolve()), "weights": cfg.MODEL.WEIGHTS, **summary}
    atomic_write_json(str(out / "summary.json"), summary, indent=1)
    print(
        f"{args.input}: {summary['head']}, input {summary['input_hw'][1]}x"
        f"{summary['input_hw'][0]}, {summary['num_instances']} instances; wrote "
        f"{len(summary['files'])} pictures and summary.json to {out}"
    )
    for k, record in enumerate(summary["instances"]):
        where = f"{record['level']} cell {record['cell']}" if "cell" in record else "cell unknown"
        print(f"  instance_{k:02d}.png: {record['class']} {record['score']:.2f} from {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
