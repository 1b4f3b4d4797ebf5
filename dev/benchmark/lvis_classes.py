"""Measure what LVIS's 1203 classes cost SOLOv2's category branch and post-processing on the CPU.

From the repository root:

    python -m dev.benchmark.lvis_classes                        # C = 80 and 1203, one thread
    python -m dev.benchmark.lvis_classes --threads 2 --json out/lvis_cost.json

What is measured: :mod:`dev.benchmark.lvis_cost`; results and their reading: docs/lvis.md.
"""

import argparse
import json
from pathlib import Path

from dev.benchmark.lvis_cost import LVISCostSettings, format_lvis_cost, measure_lvis_cost


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dev.benchmark.lvis_classes", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--classes", type=int, nargs="+", default=[80, 1203])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dup", type=int, default=4, help="classes per passing cell (k > 1)")
    parser.add_argument("--json", help="also write the full results here")
    args = parser.parse_args()
    settings = LVISCostSettings(
        classes=args.classes, threads=args.threads, repeats=args.repeats, dup=args.dup
    )
    result = measure_lvis_cost(settings)
    print(format_lvis_cost(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
