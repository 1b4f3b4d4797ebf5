#!/usr/bin/env python3
"""Check this project's SOLOv2 against a parity fixture of AdelaiDet's outputs.

    python tools/check_parity.py FIXTURE.pt [--device cpu]

The fixture (format: :mod:`solo_d2.checkpoint.parity`) holds an AdelaiDet (aim-uofa/AdelaiDet)
config and checkpoint, inference cases (model input, AdelaiDet's scores, classes and RLE masks) and
a training batch with AdelaiDet's losses. Prints one line per check and exits 0 only when every
tolerance holds: scores within 1e-3, identical classes in the same order, every mask IoU >= 0.99,
losses within 1e-3 relative.
"""

import argparse
import sys
from typing import List, Optional

import torch

# load_model is re-exported for tests/test_export.py, which loads it from this file
from solo_d2.checkpoint.parity import check_fixture, load_model  # noqa: F401


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("fixture", help="parity fixture .pt file")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        fixture = torch.load(args.fixture, weights_only=True)
    except (OSError, RuntimeError) as e:
        sys.exit(f"check_parity: cannot load fixture {args.fixture}: {e}")
    checks = check_fixture(fixture, args.device)
    for check in checks:
        print(check)
    passed = sum(c.ok for c in checks)
    print(f"{'OK' if passed == len(checks) else 'FAILED'}: {passed}/{len(checks)} checks passed")
    return 0 if passed == len(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
