#!/usr/bin/env python3
"""Export a SOLO-family model's inference, Matrix NMS included, to TorchScript or ONNX.

    python tools/export_model.py --config-file configs/SOLOv2_R18_quickstart_shapes.yaml \
        --format onnx --output export/ --opts MODEL.WEIGHTS output/quickstart/model_final.pth

Writes ``model.onnx`` or ``model.ts`` and ``export.json`` (interface, config, sizes) to --output.
The exported model takes one input ``image``: float32 (3, H, W), BGR 0-255, any H and W (what the
PyTorch model receives as "image": resize with the config's test size first), or (B, 3, H, W) with
--batch-size B. It returns ``scores`` (N,), ``classes`` (N,) int64 and ``masks`` (N, H, W) bool at
the input size (+ ``image_index`` (N,) with a batch). The ONNX graph uses only standard ops.

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
from typing import List, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # solo_d2 from this checkout when it is not installed

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import CfgNode  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from solo_d2.engine import load_config  # noqa: E402
from solo_d2.export import (  # noqa: E402
    DEFORM_CONV_OPSET,
    MIN_OPSET,
    OnnxNotInstalledError,
    SOLOExportable,
    check_standard_onnx,
    export_onnx,
    export_torchscript,
    min_opset_for,
)
from solo_d2.export.compare import compare_detections  # noqa: E402

FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.ts"}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config")
    parser.add_argument("--format", required=True, choices=sorted(FILE_NAMES))
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write to")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="B",
        help="export a fixed batch dimension: input (B, 3, H, W), outputs concatenated with an "
        "image_index output (default: one (3, H, W) image)",
    )
    parser.add_argument(
        "--sample-image",
        metavar="FILE",
        help="image to trace and verify on, resized by the config's test size (default: a "
        "deterministic noise image of the test size)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=None,
        help=f"ONNX opset (default: {MIN_OPSET}, or {DEFORM_CONV_OPSET} for models with "
        "deformable convolutions, whose ONNX DeformConv op needs it)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="device to trace on (default cpu); a TorchScript model runs on the device it was "
        "traced on",
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip running the export against PyTorch"
    )
    parser.add_argument(
        "--benchmark",
        type=int,
        default=0,
        metavar="RUNS",
        help="after verifying, time RUNS calls (after 2 warm-up calls) of the PyTorch model and "
        "of the export on the sample input and print the median and min latency",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="T",
        help="intra-op threads of PyTorch and ONNX Runtime (default: their own defaults)",
    )
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth",
    )
    return parser


def setup_cfg(args: argparse.Namespace) -> CfgNode:
    """The config of --config-file and --opts on --device (ConfigError: one line on a mistake)."""
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = args.device
    cfg.freeze()
    return cfg


def build_loaded_model(cfg: CfgNode) -> torch.nn.Module:
    """The config's model in eval mode with MODEL.WEIGHTS loaded (warns when there are none)."""
    model = build_model(cfg).eval()
    weights = cfg.MODEL.WEIGHTS
    if not weights or "ImageNetPretrained" in weights:
        print(
            f"warning: MODEL.WEIGHTS={weights!r} is no trained model: exporting randomly "
            "initialised heads (pass one with --opts MODEL.WEIGHTS model.pth)",
            file=sys.stderr,
        )
    if weights:
        if "://" not in weights and not Path(weights).is_file():
            raise ValueError(f"MODEL.WEIGHTS {weights}: no such file")
        DetectionCheckpointer(model).load(weights)
    return model


def test_size(cfg: CfgNode):
    """(h, w): the config's test resize applied to a 3:4 landscape image."""
    short, longest = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    long_side = min(int(round(short * 4 / 3)), longest)
    return short, long_side


def sample_images(cfg: CfgNode, path: Optional[str], count: int) -> List[torch.Tensor]:
    """``count`` model inputs (3, h, w) float32 of one size: the sample image (and flipped /
    shifted copies of it for a batch) or deterministic noise."""
    import detectron2.data.transforms as T
    from detectron2.data.detection_utils import read_image

    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"--sample-image {path}: no such file")
        image = read_image(path, format=cfg.INPUT.FORMAT)
        aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        image = aug.get_transform(image).apply_image(image)
        base = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
    else:
        h, w = test_size(cfg)
        g = torch.Generator().manual_seed(0)
        base = torch.randint(0, 256, (3, h, w), generator=g).to(torch.float32)
    variants = [base, base.flip(-1), base.flip(-2), base.roll(base.shape[-1] // 3, -1)]
    return [variants[i % len(variants)] for i in range(count)]


def second_size(images: List[torch.Tensor]) -> List[torch.Tensor]:
    """The images resized to about 3/4 of their size, to odd dimensions (another padding)."""
    h, w = images[0].shape[-2:]
    size = (max(h * 3 // 4 | 1, 33), max(w * 3 // 4 | 1, 33))
    return [
        torch.nn.functional.interpolate(x[None], size=size, mode="bilinear")[0].round()
        for x in images
    ]


def verify(model, exported_run, images: List[torch.Tensor], batched: bool) -> bool:
    """Run the PyTorch model and the export on ``images`` (one size); print and return agreement."""
    device = model.pixel_mean.device
    with torch.no_grad():
        refs = [model([{"image": x.to(device)}])[0]["instances"].to("cpu") for x in images]
    outputs = exported_run(torch.stack(images) if batched else images[0])
    ok = True
    for i, ref in enumerate(refs if batched else refs[:1]):
        scores, classes, masks = outputs[:3]
        if batched:
            sel = outputs[3] == i
            scores, classes, masks = scores[sel], classes[sel], masks[sel]
        agreement = compare_detections(ref, scores, classes, masks)
        h, w = images[i].shape[-2:]
        print(f"{'PASS' if agreement.ok else 'FAIL'} image {i} ({h}x{w}): {agreement}")
        ok &= agreement.ok
    return ok


def benchmark(name: str, fn, runs: int) -> None:
    """Print the median and min wall time of ``runs`` calls of ``fn`` after 2 warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
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
        cfg = setup_cfg(args)
        model = build_loaded_model(cfg)
        wrapper = SOLOExportable(model, batch_size=args.batch_size)
        opset = args.opset or min_opset_for(wrapper)
        images = sample_images(cfg, args.sample_image, args.batch_size or 1)
    except (ValueError, TypeError) as e:  # ConfigError is a ValueError
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
    info = {
        "format": args.format,
        "file": path.name,
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "head": cfg.MODEL.SOLO.get("HEAD", "SOLOv2InstanceHead"),
        "config_file": str(Path(args.config_file).resolve()),
        "weights": cfg.MODEL.WEIGHTS,
        "input": {
            "name": "image",
            "shape": (["B"] if args.batch_size else []) + [3, "H", "W"],
            "batch_size": args.batch_size,
            "format": cfg.INPUT.FORMAT,
            "range": "0-255, float32",
            "test_resize": {
                "min_size": cfg.INPUT.MIN_SIZE_TEST,
                "max_size": cfg.INPUT.MAX_SIZE_TEST,
            },
        },
        "outputs": wrapper.output_names,
        "num_classes": cfg.MODEL.SOLO.NUM_CLASSES,
        "opset": opset if args.format == "onnx" else None,
        "traced_on": str(device),
        "torch": torch.__version__,
    }
    (out_dir / "export.json").write_text(json.dumps(info, indent=2))
    if args.no_verify:
        return 0

    if args.format == "torchscript":
        loaded = torch.jit.load(str(path), map_location=device)

        def run(x):
            with torch.no_grad():
                return [t.cpu() for t in loaded(x.to(device))]

    else:
        try:
            ops = check_standard_onnx(path, opset)
            print(f"PASS ONNX checker, opset {opset}, standard ops only: {', '.join(ops)}")
            from solo_d2.export.runtime import ONNXRuntimeModel

            session = ONNXRuntimeModel(path, num_threads=args.threads)
        except OnnxNotInstalledError as e:
            print(f"verification skipped: {e}", file=sys.stderr)
            return 0
        except ValueError as e:
            print(f"FAIL {e}", file=sys.stderr)
            return 1

        def run(x):
            out = session.run(x)
            return [torch.from_numpy(np.asarray(out[name])) for name in wrapper.output_names]

    ok = verify(model, run, images, bool(args.batch_size))
    ok &= verify(model, run, second_size(images), bool(args.batch_size))
    print("OK: the export matches PyTorch" if ok else "FAILED: the export differs from PyTorch")
    if args.benchmark:
        h, w = images[0].shape[-2:]
        threads = f"{torch.get_num_threads()} PyTorch threads" + (
            f", {args.threads or 'default'} ONNX Runtime threads" if args.format == "onnx" else ""
        )
        print(f"benchmark: {len(images)} x 3 x {h} x {w} input, {threads}, {device}")
        inputs = [{"image": x.to(device)} for x in images]
        with torch.no_grad():
            benchmark("PyTorch", lambda: model(inputs), args.benchmark)
        benchmark(args.format, lambda: run(sample), args.benchmark)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
