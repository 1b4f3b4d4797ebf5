#!/usr/bin/env python3
"""Convert a TRUSTED weights file that solo_d2 refuses into a ``.pth`` of tensors that loads safely.

    python tools/convert_trusted_weights.py IN.pkl OUT.pth

solo_d2 reads weights without running code from them (:mod:`solo_d2.checkpoint.safe_load`) and
refuses a file that references anything else than arrays, numbers, strings and containers. This
tool reads IN with full pickle: UNSAFE, a hostile file runs whatever code it names, so use it only
on files from a source you trust. It writes OUT (``{"model": {name: tensor}}``, with IN's
``__author__`` and ``matching_heuristics`` so that detectron2 matches names as it did for IN),
dropping everything that is not the model's weights (optimizer, scheduler, other objects), and
checks that OUT loads with the safe loader.
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from solo_d2.atomic_io import atomic_open
from solo_d2.checkpoint.safe_load import load_checkpoint_file

# keys of a checkpoint kept besides "model": how detectron2 matches the weights to a model
KEPT_KEYS = ("__author__", "matching_heuristics")


def convert(src: Path, dst: Path) -> int:
    """Write the weights of the trusted file ``src`` to ``dst`` as tensors; their number.

    Raises:
        ValueError: ``dst`` is not a torch file name, or ``src``'s model holds something else than
            arrays and tensors.
    """
    if dst.suffix in (".pkl", ".pyth"):
        raise ValueError(f"{dst}: the output is a torch file; name it .pth")
    loaded = load_checkpoint_file(src, trust_pickle=True)
    state = {}
    for name, value in loaded["model"].items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{src}: weight {name} is a {type(value).__name__}, not an array")
        state[name] = value
    out = {"model": state, **{k: loaded[k] for k in KEPT_KEYS if k in loaded}}
    with atomic_open(str(dst), "wb") as f:
        torch.save(out, f)
    load_checkpoint_file(dst)  # raises if anything in it would still be refused
    return len(state)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", type=Path, help="trusted weights file (.pkl, .pth, ...)")
    parser.add_argument("output", type=Path, help="weights file to write (.pth)")
    args = parser.parse_args(argv)
    try:
        count = convert(args.input, args.output)
    except (OSError, ValueError) as e:
        print(f"convert_trusted_weights: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {count} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
