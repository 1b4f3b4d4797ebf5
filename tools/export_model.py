#!/usr/bin/env python3
"""Export a SOLO-family model's inference, Matrix NMS included, to TorchScript or ONNX.

    python tools/export_model.py --config-file configs/SOLOv2_R18_quickstart_shapes.yaml \
        --format onnx --output export/ --opts MODEL.WEIGHTS output/quickstart/model_final.pth

Writes ``model.onnx`` or ``model.ts`` and ``export.json`` (interface, config, sizes) to --output.
The exported model takes one input ``image``: float32 (3, H, W), BGR 0-255, any H and W (what the
PyTorch model receives as "image": resize with the config's test size first), or (B, 3, H, W) with
--batch-size B. It returns ``scores`` (N,), ``classes`` (N,) int64 and ``masks`` (N, H, W) bool at
the input size (+ ``image_index`` (N,) with a batch). The ONNX graph uses only standard ops.
A config with tiles (``INPUT.TILE.TEST``) exports the one-pass model that runs each tile;
``ONNXRuntimePredictor`` runs the tiling around it (solo_d2/modeling/tiling.py).

Unless --no-verify is given, the exported model is then run on the sample image and on a second
size, and its detections are compared with the PyTorch model's (scores within 1e-3, same classes,
mask IoU >= 0.99); the exit status is 1 when they differ. ONNX verification needs the optional
``onnx`` and ``onnxruntime`` packages (``pip install onnx onnxruntime``).
"""

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from detectron2.config import CfgNode

from solo_d2.config import load_config
from solo_d2.engine import WeightsUnavailableError, load_model
from solo_d2.export import (
    DEFORM_CONV_OPSET,
    MIN_OPSET,
    OnnxNotInstalledError,
    SOLOExportable,
    check_standard_onnx,
    export_onnx,
    export_torchscript,
    load_exported,
    min_opset_for,
    sample_images,
    second_size,
    verify_export,
)
from solo_d2.export.runtime import ONNXModelError
from solo_d2.model_zoo import resolve_config_file

FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.ts"}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add(
        "--config-file",
        required=True,
        metavar="FILE",
        help="model config: a file or a model zoo name",
    )
    add("--format", required=True, choices=sorted(FILE_NAMES))
    add("--output", required=True, metavar="DIR", help="folder to write to")
    add("--batch-size", type=int, default=None, metavar="B",
        help="export a fixed batch dimension: input (B, 3, H, W), outputs concatenated with an "
        "image_index output (default: one (3, H, W) image)")  # fmt: skip
    add("--sample-image", metavar="FILE",
        help="image to trace and verify on, resized by the config's test size (default: a "
        "deterministic noise image of the test size)")  # fmt: skip
    add("--opset", type=int, default=None,
        help=f"ONNX opset (default: {MIN_OPSET}, or {DEFORM_CONV_OPSET} for models with "
        "deformable convolutions, whose ONNX DeformConv op needs it)")  # fmt: skip
    add("--device", default="cpu",
        help="device to trace on (default cpu); a TorchScript model runs on the device it was "
        "traced on")  # fmt: skip
    add("--no-verify", action="store_true", help="skip running the export against PyTorch")
    add("--benchmark", type=int, default=0, metavar="RUNS",
        help="after verifying, time RUNS calls (after 2 warm-up calls) of the PyTorch model and "
        "of the export on the sample input and print the median and min latency")  # fmt: skip
    add("--threads", type=int, default=None, metavar="T",
        help="intra-op threads of PyTorch and ONNX Runtime (default: their own defaults)",
    )  # fmt: skip
    add("--opts", nargs=argparse.REMAINDER, default=[],
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth")  # fmt: skip
    return parser


def warn_untrained(cfg: CfgNode) -> None:
    """Warn when MODEL.WEIGHTS holds no trained model (none, or an ImageNet backbone)."""
    weights = cfg.MODEL.WEIGHTS
    if not weights or "ImageNetPretrained" in weights:
        print(
            f"warning: MODEL.WEIGHTS={weights!r} is no trained model: exporting randomly "
            "initialised heads (pass one with --opts MODEL.WEIGHTS model.pth)",
            file=sys.stderr,
        )


def describe(args: argparse.Namespace, cfg: CfgNode, wrapper: SOLOExportable, opset: int) -> Dict:
    """export.json: the exported model's interface and where it came from."""
    resize = {"min_size": cfg.INPUT.MIN_SIZE_TEST, "max_size": cfg.INPUT.MAX_SIZE_TEST}
    return {
        "format": args.format, "file": FILE_NAMES[args.format],
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "head": cfg.MODEL.SOLO.get("HEAD", "SOLOv2InstanceHead"),
        "config_file": str(Path(args.config_file).resolve()), "weights": cfg.MODEL.WEIGHTS,
        "input": {
            "name": "image", "shape": (["B"] if args.batch_size else []) + [3, "H", "W"],
            "batch_size": args.batch_size, "format": cfg.INPUT.FORMAT,
            "range": "0-255, float32", "test_resize": resize,
        },
        "outputs": wrapper.output_names, "num_classes": cfg.MODEL.SOLO.NUM_CLASSES,
        "opset": opset if args.format == "onnx" else None,
        "traced_on": str(wrapper.model.pixel_mean.device), "torch": torch.__version__,
    }  # fmt: skip


def print_latency(name: str, fn: Callable[[], object], runs: int, device: torch.device) -> None:
    """Print the median and min wall time of ``runs`` calls of ``fn`` after 2 warm-up calls."""
    times = []
    for i in range(2 + runs):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    print(
        f"latency {name}: median {1000 * statistics.median(times):.1f} ms, "
        f"min {1000 * min(times):.1f} ms over {runs} runs"
    )


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.opset is not None and args.opset < MIN_OPSET:
        parser.error(f"--opset must be at least {MIN_OPSET}")
    if args.benchmark and args.no_verify:
        parser.error("--benchmark runs after the verification: drop --no-verify")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        args.config_file = resolve_config_file(args.config_file)  # a file, else a zoo name
        cfg = load_config(args.config_file, args.opts)  # ConfigError: one line on a mistake
        warn_untrained(cfg)
        # tiles (INPUT.TILE.TEST) run around the exported per-image model, not inside it:
        # ONNXRuntimePredictor tiles as the PyTorch model does
        model, cfg = load_model(cfg, ["INPUT.TILE.TEST", False], device=args.device)
        wrapper = SOLOExportable(model, batch_size=args.batch_size)
        opset = args.opset or min_opset_for(wrapper)
        images = sample_images(cfg, args.sample_image, args.batch_size or 1)
    except (ValueError, TypeError, WeightsUnavailableError) as e:  # ConfigError, BadWeightsError
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = model.pixel_mean.device
    sample = torch.stack(images) if args.batch_size else images[0]
    sample = sample.to(device)

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILE_NAMES[args.format]
    tic = time.perf_counter()
    try:
        if args.format == "torchscript":
            export_torchscript(wrapper, sample, path)
        else:
            export_onnx(wrapper, sample, path, opset)
    except (OnnxNotInstalledError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - tic:.1f} s"
    )
    (out_dir / "export.json").write_text(json.dumps(describe(args, cfg, wrapper, opset), indent=2))
    if args.no_verify:
        return 0

    try:
        if args.format == "onnx":
            ops = check_standard_onnx(path, opset)
            print(f"PASS ONNX checker, opset {opset}, standard ops only: {', '.join(ops)}")
        run = load_exported(path, wrapper.output_names, device, args.threads)
        results = [
            result
            for batch in (images, second_size(images))
            for result in verify_export(model, run, batch, bool(args.batch_size))
        ]
    except OnnxNotInstalledError as e:
        print(f"verification skipped: {e}", file=sys.stderr)
        return 0
    except (ValueError, ONNXModelError) as e:  # ValueError: not a standard graph, mask sizes
        print(f"FAIL {e}", file=sys.stderr)
        return 1
    print("\n".join(map(str, results)))
    ok = all(r.ok for r in results)
    print("OK: the export matches PyTorch" if ok else "FAILED: the export differs from PyTorch")
    if args.benchmark:
        h, w = images[0].shape[-2:]
        threads = f"{torch.get_num_threads()} PyTorch threads" + (
            f", {args.threads or 'default'} ONNX Runtime threads" if args.format == "onnx" else ""
        )
        print(f"benchmark: {len(images)} x 3 x {h} x {w} input, {threads}, {device}")
        inputs = [{"image": x.to(device)} for x in images]
        with torch.no_grad():
            print_latency("PyTorch", lambda: model(inputs), args.benchmark, device)
        print_latency(args.format, lambda: run(sample), args.benchmark, device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
