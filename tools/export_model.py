#!/usr/bin/env python3
"""Export a SOLO-family model's inference, Matrix NMS included, to TorchScript or ONNX.

    python tools/export_model.py --config-file configs/SOLOv2_R18_quickstart_shapes.yaml \
        --format onnx --output export/ --opts MODEL.WEIGHTS output/quickstart/model_final.pth

Writes ``model.onnx`` or ``model.ts`` and ``export.json`` (interface, config, sizes) to --output.
The exported model takes one input ``image``: float32 (3, H, W), BGR 0-255, any H and W (what the
PyTorch model receives as "image": resize with the config's test size first), or (B, 3, H, W) with
--batch-size B. It returns ``scores`` (N,), ``classes`` (N,) int64 and ``masks`` (N, H, W) bool at
the input size (+ ``image_index`` (N,) with a batch); the ONNX graph also returns ``soft_masks``
(N, Hf, Wf) float32, from which ``ONNXRuntimeModel`` resizes masks to other sizes as PyTorch does.
The ONNX graph uses only standard ops. A config with tiles (``INPUT.TILE.TEST``) exports the
one-pass model that runs each tile; ``ONNXRuntimePredictor`` runs the tiling around it
(solo_d2/modeling/tiling.py).

Unless --no-verify is given, the exported model is then run on the sample image and on a second
size, and its detections are compared with the PyTorch model's (scores within 1e-3, same classes,
mask IoU >= 0.99); the exit status is 1 when they differ. ONNX verification needs the optional
``onnx`` and ``onnxruntime`` packages (``pip install onnx onnxruntime``).

``--quantize int8`` also writes ``model_int8.onnx``: the ONNX export statically quantized by ONNX
Runtime (QDQ, int8 convolutions), calibrated on --calibration-images images of the registered
--calibration-dataset resized as at test time (docs/export.md). ``--evaluate-dataset NAME``
evaluates the PyTorch model and the export (the int8 one with --quantize) on a registered dataset
with the training's evaluator, prints both and writes them into export.json; a mask AP drop
above --max-ap-drop fails (exit status 1). ``--dataset NAME=ann.json:images/`` registers datasets
as train_net.py does.

    python tools/export_model.py --config-file configs/SOLOv2_R18_quickstart_shapes.yaml \
        --format onnx --output export/ --quantize int8 --calibration-dataset shapes_train \
        --evaluate-dataset shapes_val_large --opts MODEL.WEIGHTS output/quickstart/model_final.pth
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
from detectron2.data import MetadataCatalog

from solo_d2.config import ConfigError, load_config
from solo_d2.engine import WeightsUnavailableError, load_model
from solo_d2.engine.cli import add_dataset_arguments, register_datasets_from_args
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
from solo_d2.export.evaluate import (
    DEFAULT_MAX_AP_DROP,
    check_evaluation_dataset,
    evaluate_model,
    mask_ap_drop,
)
from solo_d2.export.quantize import (
    DEFAULT_KEEP_FLOAT,
    PREDICTION_CONVS,
    calibration_images,
    layer_errors,
    quantize_export,
)
from solo_d2.export.runtime import ONNXModelError, ONNXRuntimeModel
from solo_d2.model_zoo import resolve_config_file

FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.ts"}
INT8_FILE = "model_int8.onnx"
# images of the calibration set on which --layer-errors measures (every tensor is kept in memory)
LAYER_ERROR_IMAGES = 4


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
    add("--quantize", choices=["int8"], default=None,
        help="also write model_int8.onnx: static post-training quantization of the ONNX export "
        "with ONNX Runtime (QDQ; needs --calibration-dataset)")  # fmt: skip
    add(
        "--calibration-dataset",
        metavar="NAME",
        help="registered dataset whose images (resized as at test time) calibrate --quantize",
    )
    add(
        "--calibration-images",
        type=int,
        default=32,
        metavar="N",
        help="calibration images, spread evenly over the dataset (default 32)",
    )
    add("--keep-float", action="append", default=None, metavar="NODE",
        help="leave the Conv nodes whose ONNX name contains NODE in float32 (repeatable; default: "
        f"every Conv in int8; the first to try: {' '.join(PREDICTION_CONVS)})")  # fmt: skip
    add("--no-reduce-range", action="store_true",
        help="8-bit weights instead of 7-bit: only for CPUs with VNNI (or ARM); without VNNI "
        "the int8 products can saturate")  # fmt: skip
    add("--layer-errors", action="store_true",
        help=f"measure each quantized Conv's error (SQNR, dB) on {LAYER_ERROR_IMAGES} "
        "calibration images, print the worst and write all into export.json")  # fmt: skip
    add("--evaluate-dataset", metavar="NAME",
        help="evaluate the PyTorch model and the export (int8 with --quantize) on this "
        "registered dataset; a mask AP drop above --max-ap-drop fails")  # fmt: skip
    add(
        "--max-ap-drop",
        type=float,
        default=DEFAULT_MAX_AP_DROP,
        metavar="POINTS",
        help=f"largest mask AP drop of the export (default {DEFAULT_MAX_AP_DROP})",
    )
    add_dataset_arguments(parser)
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


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse contradictory or incomplete flags (argparse's one-line usage error, status 2)."""
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.opset is not None and args.opset < MIN_OPSET:
        parser.error(f"--opset must be at least {MIN_OPSET}")
    if args.benchmark and args.no_verify:
        parser.error("--benchmark runs after the verification: drop --no-verify")
    onnx_only = [("--quantize", args.quantize), ("--evaluate-dataset", args.evaluate_dataset)]
    for flag, value in onnx_only:
        if value and args.format != "onnx":
            parser.error(f"{flag} works on ONNX exports: use --format onnx")
        if value and args.batch_size:
            parser.error(f"{flag} works on exports of one image: drop --batch-size")
    if args.quantize and not args.calibration_dataset:
        parser.error(
            "--quantize int8 needs calibration images: --calibration-dataset NAME (a registered "
            "dataset, e.g. the training set; --dataset NAME=ann.json:images/ registers one)"
        )
    quantize_only = {
        "--calibration-dataset": args.calibration_dataset,
        "--keep-float": args.keep_float,
        "--no-reduce-range": args.no_reduce_range,
        "--layer-errors": args.layer_errors,
    }
    for flag, value in quantize_only.items():
        if value and not args.quantize:
            parser.error(f"{flag} applies to --quantize int8")
    if args.calibration_images < 1:
        parser.error("--calibration-images must be at least 1")
    if args.evaluate_dataset and args.no_verify:
        parser.error("--evaluate-dataset runs the export against PyTorch: drop --no-verify")
    if args.max_ap_drop < 0:
        parser.error("--max-ap-drop must be >= 0")


def check_datasets(args: argparse.Namespace, cfg: CfgNode) -> None:
    """Register the datasets and check the ones named by the flags (ValueError naming the flag)."""
    register_datasets_from_args(args)
    for flag, name in (
        ("--calibration-dataset", args.calibration_dataset),
        ("--evaluate-dataset", args.evaluate_dataset),
    ):
        if name:
            try:
                check_evaluation_dataset(cfg, name)
            except ConfigError as e:
                raise ValueError(f"{flag} {name}: {e}") from e
            kind = MetadataCatalog.get(name).get("evaluator_type", "coco")
            if flag == "--evaluate-dataset" and kind == "coco_panoptic_seg":
                raise ValueError(
                    f"{flag} {name}: a panoptic dataset; the export holds the instances only: "
                    "name an instance dataset (COCO or LVIS format)"
                )


def quantize(args: argparse.Namespace, cfg: CfgNode, float_path: Path) -> Dict:
    """Write model_int8.onnx beside ``float_path``; return export.json's "quantization"."""
    images = calibration_images(cfg, args.calibration_dataset, args.calibration_images)
    int8_path = float_path.with_name(INT8_FILE)
    tic = time.perf_counter()
    result = quantize_export(
        float_path,
        int8_path,
        images,
        keep_float=args.keep_float or DEFAULT_KEEP_FLOAT,
        reduce_range=not args.no_reduce_range,
    )
    print(
        f"wrote {int8_path} ({int8_path.stat().st_size / 2**20:.1f} MiB) in "
        f"{time.perf_counter() - tic:.1f} s: {len(result.quantized)} Conv nodes in int8, "
        f"{len(result.kept_float)} in float32, calibrated on {len(images)} images of "
        f"{args.calibration_dataset}"
    )
    info = {
        "type": "int8", "format": "QDQ", "file": INT8_FILE, "op_types": ["Conv"],
        "activations": "uint8, per tensor, MinMax", "weights": "int8, per channel",
        "reduce_range": result.reduce_range, "calibration_dataset": args.calibration_dataset,
        "calibration_images": len(images), "kept_float": result.kept_float,
        "quantized": result.quantized,
    }  # fmt: skip
    if args.layer_errors:
        errors = layer_errors(float_path, int8_path, images[:LAYER_ERROR_IMAGES])
        info["layer_errors_db"] = errors
        worst = sorted(errors.items(), key=lambda kv: kv[1]["output"])[:8]
        print("lowest SQNR (dB) of the quantized Conv outputs: output / vs float / weight")
        for name, e in worst:
            print(f"  {e['output']:6.1f} {e['vs_float']:6.1f} {e['weight']:6.1f}  {name}")
    return info


def evaluate(args: argparse.Namespace, cfg: CfgNode, model, path: Path) -> Dict:
    """Evaluate the PyTorch model and the export on --evaluate-dataset: export.json's
    "evaluation"."""
    name, out_dir = args.evaluate_dataset, path.parent / "evaluation"
    results = {"dataset": name}
    for key, evaluated in (
        ("pytorch", model),
        ("export", ONNXRuntimeModel(path, num_threads=args.threads)),
    ):
        tic = time.perf_counter()
        results[key] = evaluate_model(cfg, evaluated, name, out_dir / key)
        print(
            f"{'PyTorch' if key == 'pytorch' else path.name} on {name}: mask AP "
            f"{results[key]['segm']['AP']:.2f}, box AP {results[key]['bbox']['AP']:.2f} "
            f"({time.perf_counter() - tic:.0f} s)"
        )
    results["mask_ap_drop"] = mask_ap_drop(results["pytorch"], results["export"])
    results["max_ap_drop"] = args.max_ap_drop
    return results


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = get_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        args.config_file = resolve_config_file(args.config_file)  # a file, else a zoo name
        cfg = load_config(args.config_file, args.opts)  # ConfigError: one line on a mistake
        check_datasets(args, cfg)
        warn_untrained(cfg)
        # tiles (INPUT.TILE.TEST) run around the exported per-image model, not inside it:
        # ONNXRuntimePredictor tiles as the PyTorch model does
        model, cfg = load_model(cfg, ["INPUT.TILE.TEST", False], device=args.device)
        # ONNX: also the soft masks, which the runtime resizes to other sizes as PyTorch does
        wrapper = SOLOExportable(
            model, batch_size=args.batch_size, soft_masks=args.format == "onnx"
        )
        opset = args.opset or min_opset_for(wrapper)
        images = sample_images(cfg, args.sample_image, args.batch_size or 1)
    except (ValueError, TypeError, OSError, WeightsUnavailableError) as e:  # ConfigError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = model.pixel_mean.device
    sample = torch.stack(images) if args.batch_size else images[0]
    sample = sample.to(device)

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILE_NAMES[args.format]
    info = describe(args, cfg, wrapper, opset)
    tic = time.perf_counter()
    try:
        if args.format == "torchscript":
            export_torchscript(wrapper, sample, path)
        else:
            export_onnx(wrapper, sample, path, opset)
        print(
            f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in "
            f"{time.perf_counter() - tic:.1f} s"
        )
        if args.quantize:
            info["quantization"] = quantize(args, cfg, path)
            info["file"], info["float_file"] = INT8_FILE, path.name
    except (OnnxNotInstalledError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_description(out_dir, info)
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
        final = out_dir / info["file"]
        if args.quantize:
            run_int8 = load_exported(final, wrapper.output_names, device, args.threads)
            int8_results = verify_export(model, run_int8, images, False)
    except OnnxNotInstalledError as e:
        print(f"verification skipped: {e}", file=sys.stderr)
        return 0
    except (ValueError, ONNXModelError) as e:  # ValueError: not a standard graph, mask sizes
        print(f"FAIL {e}", file=sys.stderr)
        return 1
    print("\n".join(map(str, results)))
    ok = all(r.ok for r in results)
    print("OK: the export matches PyTorch" if ok else "FAILED: the export differs from PyTorch")
    if args.quantize:
        # int8 cannot match to 1e-3: its accuracy is what --evaluate-dataset checks
        print("\n".join(f"int8 vs PyTorch, informative: {r.agreement}" for r in int8_results))
        if not args.evaluate_dataset:
            print(
                "warning: the int8 model's accuracy is unchecked: add --evaluate-dataset NAME",
                file=sys.stderr,
            )
    if args.evaluate_dataset:
        info["evaluation"] = evaluate(args, cfg, model, final)
        write_description(out_dir, info)
        drop = info["evaluation"]["mask_ap_drop"]
        passed = drop <= args.max_ap_drop
        print(
            f"{'PASS' if passed else 'FAIL'} mask AP drop of the export {drop:.2f} "
            f"(at most {args.max_ap_drop}) on {args.evaluate_dataset}"
        )
        ok = ok and passed
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
        if args.quantize:
            print_latency("onnx int8", lambda: run_int8(sample), args.benchmark, device)
    return 0 if ok else 1


def write_description(out_dir: Path, info: Dict) -> None:
    (out_dir / "export.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    sys.exit(main())
