"""Benchmark solo_d2: per-stage latency, throughput, training step, data loading, peak memory.

From the repository root:

    python -m dev.benchmark                                    # every stage, CPU, R50-FPN
    python -m dev.benchmark --stages matrix_nms postprocess_memory --json out/bench.json
    python -m dev.benchmark --device cuda --amp                # on a GPU, AMP training too
    python -m dev.benchmark.startup --kind coco lvis panoptic  # COCO/LVIS/panoptic start-up

Stages (``--stages``; each runs in its own subprocess unless ``--no-isolate``; what each measures:
:mod:`dev.benchmark.stages`): ``inference`` (batch 1 at ``--size``: backbone+FPN, instance
branch, mask-feature branch, post-processing with the network's candidates and with
``--candidates``, the whole model), ``throughput`` (``--batch-sizes``), ``matrix_nms``
(``--nms-masks`` masks of ``--nms-size``), ``postprocess_memory`` (``--many-candidates``),
``train`` (a step on ``--train-batch`` images of ``--train-size``; grid assignment; mapper
targets), ``loader`` (SOLODatasetMapper with ``--workers`` processes).

Timings are medians over ``--repeats`` runs after ``--warmup`` runs (CUDA is synchronised around
each), all measured in this run; the report starts with the machine, device and thread count, and
gives each stage's input sizes. Weights are random (``MODEL.WEIGHTS ""``) unless ``--weights``.
"""

import argparse
import dataclasses
import json
import os
from typing import Dict, Optional, Sequence, Tuple

import torch

from dev.benchmark import (
    STAGES,
    BenchmarkSettings,
    format_report,
    machine_info,
    run_stage,
    run_stage_isolated,
)
from dev.benchmark.stages import REPO

SETTINGS = {f.name for f in dataclasses.fields(BenchmarkSettings)}


def _size(text: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must be HxW (e.g. 800x1344), got {text!r}"
        ) from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def get_parser() -> argparse.ArgumentParser:
    d = BenchmarkSettings(config_file=str(REPO / "configs" / "SOLOv2_R50_3x.yaml"))
    p = argparse.ArgumentParser(
        prog="python -m dev.benchmark",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config-file", default=d.config_file)
    p.add_argument("--weights", default=d.weights, help="checkpoint to load (default: random init)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=_positive, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        default=[s for s in STAGES if s != "levers"],
        help="default: all but levers",
    )
    p.add_argument("--size", type=_size, default=d.size, help="inference input HxW")
    for flag in ("nms-size", "train-size"):
        p.add_argument(f"--{flag}", type=_size, default=getattr(d, flag.replace("-", "_")))
    p.add_argument("--batch-sizes", type=_positive, nargs="+", default=d.batch_sizes)
    p.add_argument(
        "--candidates", type=_positive, default=d.candidates,
        help="post-processing candidates of the fixed-candidates measurement (default: 405, the "
        "number in AdelaiDet's published R50 run)",
    )  # fmt: skip
    p.add_argument(
        "--repeats", type=_positive, default=d.repeats, help="timed runs per measurement"
    )
    for flag in (
        "many-candidates", "nms-masks", "train-batch", "train-instances", "loader-images",
        "loader-batch", "loader-batches", "nms-repeats", "throughput-repeats", "train-repeats",
        "matmul-size",
    ):  # fmt: skip
        p.add_argument(f"--{flag}", type=_positive, default=getattr(d, flag.replace("-", "_")))
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers, help="data-loader worker processes")
    p.add_argument("--amp", action="store_true", help="also time training under autocast")
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=d.channels_last,
        help="MODEL.SOLO.CHANNELS_LAST: conv weights in NHWC format (default: on)",
    )
    p.add_argument("--no-isolate", action="store_true", help="run every stage in this process")
    p.add_argument("--json", metavar="PATH", help="write the full results as JSON")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    settings = BenchmarkSettings(**{k: v for k, v in vars(args).items() if k in SETTINGS})
    report = {
        "machine": machine_info(torch.device(args.device)),
        "settings": {**dataclasses.asdict(settings), "stages": args.stages},
        "results": {},
        "load_average": {},
    }
    for stage in args.stages:
        if args.no_isolate:
            start_load = os.getloadavg()[0]
            res = run_stage(stage, settings)
            res["_load"] = [start_load, os.getloadavg()[0]]
        else:
            res = run_stage_isolated(stage, settings)
        report["load_average"][stage] = res.pop("_load")
        report["results"][stage] = res
    report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(format_report(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
