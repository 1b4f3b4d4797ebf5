#!/usr/bin/env python3
"""Convert a checkpoint of the official SOLO repository (WXinlong/SOLO, mmdetection v1) to solo_d2.

    python tools/convert_official_solo.py IN.pth OUT.pth [--config configs/X.yaml]

IN.pth is one of the official SOLO, Decoupled SOLO, Decoupled SOLO light (DCN), SOLOv2 (DCN,
light) checkpoints (mmcv format ``{"meta", "state_dict"}``), or a torchvision-style ImageNet
ResNet/ResNeXt (``conv1.weight``, ``layer1.0...``, ``fc.*``) to initialise a backbone. Every key is
renamed to this project's layout (the rules: :mod:`solo_d2.model_zoo.official`); a key that
matches no rule is reported and the conversion fails, writing nothing.

It writes OUT.pth (``{"model": state_dict}``, loadable with MODEL.WEIGHTS) and OUT.yaml, the config
those weights need: ``_BASE_`` the given config (by default the config in configs/ whose
architecture matches the checkpoint), the architecture read off the tensors (head, towers,
channels, grids, DCN), and the official input convention, which differs from detectron2's MSRA
backbones: RGB input, ImageNet mean/std normalisation, stride in the 3x3 conv
(``INPUT.FORMAT: RGB``, ``MODEL.PIXEL_MEAN/STD``, ``MODEL.RESNETS.STRIDE_IN_1X1: False``).
It then builds that model and checks the weights load with no missing, unexpected or misshapen
tensor.
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from solo_d2.model_zoo.official import ConversionError, convert

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", type=Path, help="official checkpoint (.pth)")
    parser.add_argument("output", type=Path, help="converted checkpoint to write (.pth)")
    parser.add_argument(
        "--config", type=Path, default=None,
        help="config the weights are for (_BASE_ of OUT.yaml); default: the matching one in "
        "configs/",
    )  # fmt: skip
    parser.add_argument(
        "--trust-pickle", action="store_true",
        help="UNSAFE, only for files from a trusted source: load with full pickle, which runs "
        "any code the file names, when the weights-only loader refuses the file",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        convert(args.input, args.output, args.config, args.trust_pickle, CONFIGS, log=print)
    except ConversionError as e:
        print(f"convert_official_solo: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
