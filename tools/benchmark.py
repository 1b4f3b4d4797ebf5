#!/usr/bin/env python3
"""Benchmark solo_d2: per-stage latency, throughput, training step, data loading, peak memory.

    python tools/benchmark.py                                  # every stage, CPU, R50-FPN
    python tools/benchmark.py --stages matrix_nms postprocess --json out/bench.json
    python tools/benchmark.py --device cuda --amp              # on a GPU, AMP training too

Stages (``--stages``; each runs in its own subprocess unless ``--no-isolate``):

* ``inference``   batch 1 at ``--size`` (800x1344): backbone+FPN, instance branch, mask-feature
  branch, post-processing (head outputs -> final Instances) and the whole ``model(inputs)``.
  The category classifier's bias is set so that one class passes the score threshold in every
  grid cell (random weights give no detections otherwise); the number of candidates left after
  points NMS is reported. Post-processing is also timed with category scores built to leave
  exactly ``--candidates`` (405) candidates, the reference condition.
* ``throughput``  images/s of ``model(inputs)`` for ``--batch-sizes`` (1 2 4) same-size images.
* ``matrix_nms``  Matrix NMS alone on ``--nms-masks`` (500) masks of ``--nms-size`` (200x336).
* ``postprocess_memory``  post-processing with ``--many-candidates`` (20000) candidates passing
  the score threshold: time and peak memory (bounded by MODEL.SOLO.INFERENCE_CHUNK_SIZE).
* ``train``  forward+backward of a batch of ``--train-batch`` (2) images of ``--train-size``
  (640x832) with ``--train-instances`` (8) instances each; the grid assignment inside the model
  (``assign_grid_targets``), and the per-image target work done in the mapper workers.
* ``loader``  data-loader throughput (SOLODatasetMapper, ``--workers`` processes) on a
  generated shapes dataset with COCO-like image sizes.

Timings are medians over ``--repeats`` runs after ``--warmup`` runs (CUDA is synchronised around
each). Peak memory is the increase over the level when the measurement starts: on CUDA
``torch.cuda.max_memory_allocated``; on Linux CPUs the resident-set high-water mark (VmHWM,
reset through /proc/self/clear_refs before each measurement), otherwise the ``ru_maxrss``
increase (a lower bound). Weights are random (``MODEL.WEIGHTS ""``) unless ``--weights`` is given:
speed does not depend on their values, only on the candidates they produce.
"""

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, ImageList, Instances
from detectron2.utils.events import EventStorage

from solo_d2 import add_solo_config
from solo_d2.modeling import meta_arch as solo_meta_arch
from solo_d2.modeling.heads import split_instance_features
from solo_d2.modeling.postprocessing import matrix_nms, point_nms
from solo_d2.modeling.targets import extra_mask_targets, instance_targets

REPO = Path(__file__).resolve().parent.parent
STAGES = ("inference", "throughput", "matrix_nms", "postprocess_memory", "train", "loader")

# AdelaiDet's SOLOv2 on a 2-core CPU machine like this project's build machine (2 threads,
# R50-FPN, 800x1344, heads set so one class passes the score threshold in every cell), and the
# targets this project set itself (README "Speed"). Seconds.
REFERENCE_CPU = {
    "inference/total": {"adelaidet_s": [3.75, 4.76], "target_s": 3.75},
    "inference/backbone_fpn": {"adelaidet_s": [1.95]},
    "inference/postprocess_reference_candidates": {"adelaidet_s": [0.86], "target_s": 0.4},
    "matrix_nms": {"adelaidet_s": [0.28], "target_s": 0.14},
    "train/forward_backward": {"adelaidet_s": [12.1]},
    "train/grid_assignment": {"adelaidet_s": [0.13], "target_s": 0.010},
}
REFERENCE_CANDIDATES = 405  # AdelaiDet's candidates after points NMS in the reference run


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times: Sequence[float], cpu_times: Optional[Sequence[float]] = None) -> Dict:
    """Median, min, max and every wall-clock time of a list of seconds (and the process's CPU
    seconds per run: all its threads together, less sensitive than wall time to other load)."""
    out = {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
        "times_s": [round(t, 6) for t in times],
    }
    if cpu_times:
        out["cpu_median_s"] = statistics.median(cpu_times)
    return out


def time_fn(fn: Callable[[], object], *, repeats: int, warmup: int, device: torch.device) -> Dict:
    """Run ``fn`` ``warmup`` times, then time ``repeats`` runs (CUDA synchronised around each)."""
    for _ in range(warmup):
        fn()
    times, cpu_times = [], []
    for _ in range(repeats):
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return summarize(times, cpu_times)


def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kb("VmHWM") is not None


class PeakMemory:
    """Peak memory of the code in a ``with`` block, above the level at its start.

    ``method`` says how it was measured: "cuda_max_memory_allocated" (tensors on the GPU),
    "VmHWM" (resident set of the whole process, exact high-water mark) or "ru_maxrss" (the
    increase of the process's lifetime peak: a lower bound, 0 when an earlier peak was higher).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: Optional[int] = None
        self.method = ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda_max_memory_allocated"
            self._base = torch.cuda.memory_allocated(self.device)
        elif _reset_rss_peak():
            self.method = "VmHWM"
            self._base = _proc_status_kb("VmRSS") * 1024
        else:
            self.method = "ru_maxrss"
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "VmHWM":
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_bytes = max(0, peak - self._base)
        return False

    def as_dict(self) -> Dict:
        return {"peak_mem_mb": round(self.peak_bytes / 2**20, 1), "mem_method": self.method}


def measure(fn, *, repeats: int, warmup: int, device: torch.device) -> Dict:
    """:func:`time_fn` plus the peak memory of the timed runs."""
    with PeakMemory(device) as mem:
        result = time_fn(fn, repeats=repeats, warmup=warmup, device=device)
    return {**result, **mem.as_dict()}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> Dict:
    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        ),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        info["git_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


# ------------------------------------------------------------------------------------------------
# model and inputs
# ------------------------------------------------------------------------------------------------
def build_cfg(config_file: str, opts: Sequence[str], device: str, weights: str = ""):
    cfg = get_cfg()
    add_solo_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = weights
    return cfg


def build_benchmark_model(cfg, seed: int = 0, channels_last: bool = False):
    """The model of ``cfg`` (random weights unless MODEL.WEIGHTS), in eval mode.

    ``channels_last``: convolution weights in NHWC memory format; convolutions then produce NHWC
    outputs (faster oneDNN kernels on CPU; results differ from NCHW in float rounding only).
    """
    torch.manual_seed(seed)
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model.eval()


def one_class_everywhere(model, class_index: int = 0) -> None:
    """Set the classifier so that class ``class_index`` passes the score threshold in every cell.

    Its bias becomes 0 (probability 0.5 before the weights' contribution); with random weights
    (normal, std 0.01) the logits then stay well above logit(SCORE_THRESH_TEST); the other classes
    keep the prior bias (probability 0.01, below the threshold).
    """
    with torch.no_grad():
        model.ins_head.cate_pred.bias[class_index] = 0.0


def synthetic_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A deterministic (3, h, w) uint8 image: smooth colour blobs plus fine noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(h // 64, 2), max(w // 64, 2), generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
    noise = torch.rand(3, h, w, generator=g) * 0.25
    return ((smooth * 0.75 + noise).clamp(0, 1) * 255).to(torch.uint8)


def inference_inputs(batch: int, h: int, w: int, seed: int = 0) -> List[Dict]:
    return [
        {"image": synthetic_image(h, w, seed + i), "height": h, "width": w} for i in range(batch)
    ]


def _random_masks(num: int, h: int, w: int, g: torch.Generator, min_size=16.0, max_size=None):
    """``num`` (h, w) bool masks, ellipses and rectangles of log-uniform sizes (all levels)."""
    max_size = max_size or 0.8 * min(h, w)
    ys, xs = torch.arange(h)[:, None].float(), torch.arange(w)[None, :].float()
    masks = torch.zeros(num, h, w, dtype=torch.bool)
    for i in range(num):
        size = math.exp(
            math.log(min_size) + torch.rand(1, generator=g).item() * math.log(max_size / min_size)
        )
        rx = size / 2 * (0.6 + 0.8 * torch.rand(1, generator=g).item())
        ry = size * size / 4 / rx
        cx = rx + torch.rand(1, generator=g).item() * max(w - 2 * rx, 1)
        cy = ry + torch.rand(1, generator=g).item() * max(h - 2 * ry, 1)
        if i % 2:
            masks[i] = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
        else:
            masks[i] = ((xs - cx).abs() <= rx) & ((ys - cy).abs() <= ry)
    return masks


def training_inputs(model, batch: int, h: int, w: int, num_instances: int, seed: int = 0):
    """Training inputs as SOLODatasetMapper makes them: images, and per image
    ``num_instances`` instances with boxes, centres and masks at the model's mask strides.

    Returns:
        (inputs, masks): the inputs, and each image's (N, h, w) bool full-size masks.
    """
    g = torch.Generator().manual_seed(seed)
    num_classes = model.ins_head.num_classes
    inputs, all_masks = [], []
    for b in range(batch):
        masks = _random_masks(num_instances, h, w, g)
        inst = mapper_targets(model, masks)
        inst.gt_classes = torch.randint(0, num_classes, (num_instances,), generator=g)
        inputs.append({"image": synthetic_image(h, w, seed + b), "instances": inst})
        all_masks.append(masks)
    return inputs, all_masks


def mapper_targets(model, masks: torch.Tensor) -> Instances:
    """The per-image target work of SOLODatasetMapper (its workers do it, not the model)."""
    valid, centers, small = instance_targets(masks, model.mask_stride)
    inst = Instances(tuple(masks.shape[-2:]))
    inst.gt_boxes = BitMasks(masks).get_bounding_boxes()
    inst.gt_centers = centers
    inst.gt_masks_small = small
    for name, value in extra_mask_targets(masks, model.mask_stride, model.mask_strides).items():
        inst.set(name, value)
    return inst


# ------------------------------------------------------------------------------------------------
# category scores with a chosen number of candidates
# ------------------------------------------------------------------------------------------------
def candidate_logits(
    num_grids: Sequence[int],
    num_classes: int,
    num_candidates: int,
    batch: int = 1,
    seed: int = 0,
    device="cpu",
) -> List[torch.Tensor]:
    """Category logits where exactly ``num_candidates`` (cell, class) pairs survive points NMS.

    Classes are filled in order (class 0's cells first, then class 1's, ...); in each used class
    every cell passes any score threshold below 0.15, but only the chosen cells are maxima of
    points NMS: chosen cells get scores in (0.2, 0.9) increasing in row-major order, the others
    scores just under 0.15 decreasing in row-major order, so each of those has an earlier (up,
    left or up-left) neighbour that is higher. Cell (0, 0) of each level is always chosen.

    Returns:
        per level, (batch, C, S, S) logits; unused classes get logit -10.
    """
    num_cells = sum(s * s for s in num_grids)
    if not len(num_grids) <= num_candidates <= num_cells * num_classes:
        raise ValueError(
            f"num_candidates must be in [{len(num_grids)}, {num_cells * num_classes}] for grids "
            f"{list(num_grids)} and {num_classes} classes, got {num_candidates}"
        )
    g = torch.Generator().manual_seed(seed)
    starts = np.cumsum([0] + [s * s for s in num_grids])[:-1].tolist()
    probs = torch.full((num_classes, num_cells), 1e-5)
    left = num_candidates
    for c in range(num_classes):
        k = min(left, num_cells)
        if k == 0:
            break
        chosen = torch.zeros(num_cells, dtype=torch.bool)
        first = torch.tensor(starts)
        chosen[first] = True
        others = torch.ones(num_cells, dtype=torch.bool)
        others[first] = False
        extra = max(k - len(first), 0)
        pick = others.nonzero(as_tuple=True)[0]
        chosen[pick[torch.randperm(len(pick), generator=g)[:extra]]] = True
        if k < len(first):  # fewer candidates than levels left for this class
            chosen[first[k:]] = False
        rank = torch.arange(num_cells, dtype=torch.float32) / num_cells
        probs[c] = torch.where(chosen, 0.2 + 0.7 * rank, 0.149 - 0.04 * rank)
        left -= int(chosen.sum())
    logits = torch.logit(probs)
    out = []
    for s, start in zip(num_grids, starts):
        level = logits[:, start : start + s * s].reshape(1, num_classes, s, s)
        out.append(level.expand(batch, -1, -1, -1).contiguous().to(device))
    return out


def count_candidates(cate_logits: Sequence[torch.Tensor], score_threshold: float) -> List[int]:
    """Per image, the (cell, class) pairs above the threshold after points NMS."""
    return [
        int(n)
        for n in sum(
            (point_nms(c.sigmoid()) > score_threshold).flatten(1).sum(dim=1) for c in cate_logits
        ).tolist()
    ]


@contextlib.contextmanager
def fixed_head_outputs(model, images: ImageList, outputs):
    """Within the block, ``model.inference`` skips preprocessing and the network: it gets
    ``images`` and the head ``outputs`` directly, so only grouping and post-processing run."""
    model.preprocess_image = lambda batched_inputs: images
    model.predict = lambda tensor: outputs
    try:
        yield
    finally:
        del model.preprocess_image, model.predict


# ------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------
def bench_inference(model, args, device) -> Dict:
    """Per-stage latency of one image at args.size and the whole ``model(inputs)``."""
    h, w = args.size
    inputs = inference_inputs(1, h, w, seed=args.seed)
    rep, warm = args.repeats, args.warmup
    res = {}
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        x = images.tensor
        res["preprocess"] = measure(
            lambda: model.preprocess_image(inputs), repeats=rep, warmup=warm, device=device
        )
        res["backbone_fpn"] = measure(
            lambda: model.backbone(x), repeats=rep, warmup=warm, device=device
        )
        features = model.backbone(x)
        ins_feats = [features[f] for f in model.instance_in_features]
        res["instance_branch"] = measure(
            lambda: model.ins_head(split_instance_features(ins_feats)),
            repeats=rep,
            warmup=warm,
            device=device,
        )
        if model.mask_head is not None:
            mask_feats = [features[f] for f in model.mask_in_features]
            res["mask_feature_branch"] = measure(
                lambda: model.mask_head(mask_feats), repeats=rep, warmup=warm, device=device
            )
        outputs = model.predict(x)
        natural = count_candidates(outputs[0], model.inference_args["score_threshold"])[0]
        with fixed_head_outputs(model, images, outputs):
            res["postprocess"] = measure(
                lambda: model(inputs), repeats=rep, warmup=warm, device=device
            )
            detections = len(model(inputs)[0]["instances"])
        res["postprocess"].update(candidates=natural, detections=detections)

        logits = candidate_logits(
            model.ins_head.num_grids,
            model.ins_head.num_classes,
            args.candidates,
            seed=args.seed,
            device=device,
        )
        outputs_ref = (logits, *outputs[1:])
        n_ref = count_candidates(logits, model.inference_args["score_threshold"])[0]
        with fixed_head_outputs(model, images, outputs_ref):
            res["postprocess_reference_candidates"] = measure(
                lambda: model(inputs), repeats=rep, warmup=warm, device=device
            )
            detections = len(model(inputs)[0]["instances"])
        res["postprocess_reference_candidates"].update(candidates=n_ref, detections=detections)

        res["total"] = measure(lambda: model(inputs), repeats=rep, warmup=warm, device=device)
        res["total"]["candidates"] = natural
    res["input"] = {"batch": 1, "height": h, "width": w, "padded": list(x.shape[-2:])}
    return res


def bench_throughput(model, args, device) -> Dict:
    h, w = args.size
    res = {}
    with torch.no_grad():
        for b in args.batch_sizes:
            inputs = inference_inputs(b, h, w, seed=args.seed)
            r = measure(
                lambda inputs=inputs: model(inputs),
                repeats=args.throughput_repeats,
                warmup=1,
                device=device,
            )
            r["images_per_s"] = b / r["median_s"]
            r["batch"] = b
            res[f"batch{b}"] = r
    res["input"] = {"height": h, "width": w}
    return res


def matrix_nms_inputs(num: int, h: int, w: int, seed: int = 0, device="cpu"):
    """Inputs of :func:`matrix_nms` as post-processing makes them: bool masks sorted by score."""
    g = torch.Generator().manual_seed(seed)
    masks = _random_masks(num, h, w, g, min_size=4.0, max_size=0.9 * min(h, w))
    labels = torch.randint(0, 3, (num,), generator=g)
    scores = torch.rand(num, generator=g).sort(descending=True).values
    areas = masks.flatten(1).sum(dim=1).float()
    return [t.to(device) for t in (labels, masks, areas, scores)]


def bench_matrix_nms(args, device) -> Dict:
    h, w = args.nms_size
    labels, masks, areas, scores = matrix_nms_inputs(args.nms_masks, h, w, args.seed, device)
    r = measure(
        lambda: matrix_nms(labels, masks, areas, scores),
        repeats=args.nms_repeats,
        warmup=max(args.warmup, 1),
        device=device,
    )
    r.update(masks=args.nms_masks, height=h, width=w, dtype=str(masks.dtype))
    return {"matrix_nms": r}


def bench_postprocess_memory(model, args, device) -> Dict:
    """Post-processing when ``args.many_candidates`` pairs pass the threshold, against the
    reference number of candidates (memory should not grow with the candidates)."""
    h, w = args.size
    inputs = inference_inputs(1, h, w, seed=args.seed)
    res = {}
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        outputs = model.predict(images.tensor)
        for name, n in (("few", args.candidates), ("many", args.many_candidates)):
            logits = candidate_logits(
                model.ins_head.num_grids,
                model.ins_head.num_classes,
                n,
                seed=args.seed,
                device=device,
            )
            with fixed_head_outputs(model, images, (logits, *outputs[1:])):
                r = measure(lambda: model(inputs), repeats=1, warmup=0, device=device)
            r["candidates"] = count_candidates(logits, model.inference_args["score_threshold"])[0]
            res[name] = r
    hf, wf = outputs[2].shape[-2:] if outputs[2] is not None else (h // 4, w // 4)
    res["unchunked_soft_masks_mb"] = round(args.many_candidates * hf * wf * 4 / 2**20, 1)
    res["chunk_size"] = model.inference_args["chunk_size"]
    return res


def bench_train(model, args, device) -> Dict:
    h, w = args.train_size
    inputs, masks = training_inputs(
        model, args.train_batch, h, w, args.train_instances, seed=args.seed
    )
    inputs = [{"image": x["image"], "instances": x["instances"].to(device)} for x in inputs]
    model.train()
    res = {}

    grid_times = []
    original = solo_meta_arch.assign_grid_targets

    def timed_assignment(*a, **kw):
        synchronize(device)
        start = time.perf_counter()
        out = original(*a, **kw)
        synchronize(device)
        grid_times.append(time.perf_counter() - start)
        return out

    def step(amp: bool):
        model.zero_grad(set_to_none=True)
        with EventStorage(), torch.autocast(
            device.type,
            dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
            enabled=amp,
        ):
            losses = model(inputs)
        sum(losses.values()).backward()
        return {k: float(v.detach()) for k, v in losses.items()}

    variants = [False, True] if args.amp else [False]
    solo_meta_arch.assign_grid_targets = timed_assignment
    try:
        for amp in variants:
            key = "forward_backward_amp" if amp else "forward_backward"
            grid_times.clear()
            res[key] = measure(
                lambda amp=amp: step(amp), repeats=args.train_repeats, warmup=1, device=device
            )
            res[key]["losses"] = step(amp)
            if not amp:
                res["grid_assignment_in_step"] = summarize(grid_times[1:])  # after the warm-up
    finally:
        solo_meta_arch.assign_grid_targets = original
    if args.amp:
        ref, amp_losses = res["forward_backward"]["losses"], res["forward_backward_amp"]["losses"]
        res["amp_check"] = {
            "finite": all(math.isfinite(v) for v in amp_losses.values()),
            "max_rel_diff": max(abs(amp_losses[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in ref),
        }

    # the assignment alone, on the same ground truth (what the model calls per batch)
    gt = [x["instances"] for x in inputs]
    canvas = tuple(model.preprocess_image(inputs).tensor.shape[-2:])
    res["grid_assignment"] = time_fn(
        lambda: model.assign_targets(gt, canvas),
        repeats=max(args.repeats, 20),
        warmup=2,
        device=device,
    )
    _, positives = model.assign_targets(gt, canvas)
    res["grid_assignment"]["positive_samples"] = sum(len(p) for p in positives)
    res["mapper_targets_per_image"] = time_fn(
        lambda: mapper_targets(model, masks[0]),
        repeats=max(args.repeats, 5),
        warmup=1,
        device=torch.device("cpu"),
    )
    model.eval()
    res["input"] = {
        "batch": args.train_batch,
        "height": h,
        "width": w,
        "instances_per_image": args.train_instances,
        "amp_dtype": ("float16" if device.type == "cuda" else "bfloat16") if args.amp else None,
    }
    return res


def bench_loader(cfg, args) -> Dict:
    """Images/s of detectron2's training loader with SOLODatasetMapper on generated images."""
    from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
    from detectron2.data.datasets import load_coco_json

    from solo_d2.data.dataset_mapper import SOLODatasetMapper
    from solo_d2.data.shapes import SHAPES_CLASSES, generate_shapes

    cfg = cfg.clone()
    res = {}
    with tempfile.TemporaryDirectory(prefix="solo_bench_") as tmp:
        start = time.perf_counter()
        json_file = generate_shapes(
            tmp, "bench", args.loader_images, seed=args.seed, min_size=480, max_size=640
        )
        res["dataset_generation_s"] = time.perf_counter() - start
        name = f"solo_benchmark_{os.getpid()}"
        DatasetCatalog.register(name, lambda: load_coco_json(json_file, f"{tmp}/bench", name))
        MetadataCatalog.get(name).set(thing_classes=list(SHAPES_CLASSES))
        cfg.defrost()
        cfg.DATASETS.TRAIN = (name,)
        cfg.SOLVER.IMS_PER_BATCH = args.loader_batch
        cfg.DATALOADER.NUM_WORKERS = args.workers
        mapper = SOLODatasetMapper(cfg, True)
        dicts = DatasetCatalog.get(name)
        res["mapper_per_image"] = time_fn(
            lambda: [mapper(copy.deepcopy(d)) for d in dicts[:1]],
            repeats=max(args.repeats, 5),
            warmup=1,
            device=torch.device("cpu"),
        )
        loader = iter(build_detection_train_loader(cfg, mapper=mapper))
        start = time.perf_counter()
        next(loader)
        res["first_batch_s"] = time.perf_counter() - start
        times = []
        for _ in range(args.loader_batches):
            start = time.perf_counter()
            batch = next(loader)
            times.append(time.perf_counter() - start)
        res["batch"] = summarize(times)
        res["images_per_s"] = args.loader_batch * len(times) / sum(times)
        res["input"] = {
            "images": args.loader_images,
            "batch": args.loader_batch,
            "workers": args.workers,
            "image_short_side": [480, 640],
            "min_size_train": list(cfg.INPUT.MIN_SIZE_TRAIN),
            "example_batch_shapes": [list(x["image"].shape) for x in batch],
        }
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    return res


def run_stage(stage: str, args) -> Dict:
    device = torch.device(args.device)
    cfg = build_cfg(args.config_file, args.opts, args.device, args.weights)
    if stage == "matrix_nms":
        return bench_matrix_nms(args, device)
    if stage == "loader":
        return bench_loader(cfg, args)
    model = build_benchmark_model(cfg, seed=args.seed, channels_last=args.channels_last)
    if stage == "train":
        return bench_train(model, args, device)
    one_class_everywhere(model)
    if stage == "inference":
        return bench_inference(model, args, device)
    if stage == "throughput":
        return bench_throughput(model, args, device)
    if stage == "postprocess_memory":
        return bench_postprocess_memory(model, args, device)
    raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")


def run_stage_isolated(stage: str, argv: List[str]) -> Dict:
    """Run one stage in a fresh Python process (its own memory high-water mark)."""
    with tempfile.TemporaryDirectory(prefix="solo_bench_") as tmp:
        out = os.path.join(tmp, "stage.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", stage, out, *argv]
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark stage {stage!r} failed (exit {proc.returncode})")
        with open(out) as f:
            return json.load(f)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _flatten(results: Dict) -> List[Tuple[str, Dict]]:
    rows = []
    for stage, res in results.items():
        for key, r in res.items():
            if isinstance(r, dict) and "median_s" in r:
                name = stage if key == stage else f"{stage}/{key}"
                rows.append((name, r))
    return rows


def format_report(report: Dict) -> str:
    m = report["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cpu_cores']} cores ({m['cpu_cores_usable']} usable), "
        f"{m.get('gpu', 'no GPU used')}; torch {m['torch']}, {m['torch_threads']} threads, "
        f"device {m['device']}, dtype float32"
        + (", channels-last" if report["settings"].get("channels_last") else ""),
        f"config: {report['settings']['config_file']}, weights: "
        f"{report['settings']['weights'] or 'random init'}",
    ]
    lines.append(
        f"{'measurement':44s} {'median':>10s} {'min':>10s} {'CPU med.':>10s} {'n':>3s} "
        f"{'peak MB':>8s}  notes"
    )
    cpu = report["machine"]["device"] == "cpu"
    for name, r in _flatten(report["results"]):
        notes = []
        for k in ("candidates", "detections", "images_per_s", "masks", "positive_samples"):
            if k in r:
                v = r[k]
                notes.append(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}")
        ref = REFERENCE_CPU.get(name)
        if ref and cpu and at_reference_conditions(name, report["settings"]):
            notes.append("AdelaiDet " + "/".join(f"{v:g}" for v in ref["adelaidet_s"]) + " s")
            if "target_s" in ref:
                notes.append(f"target <= {ref['target_s']:g} s")
        peak = f"{r['peak_mem_mb']:.1f}" if "peak_mem_mb" in r else "-"
        cpu_s = _fmt_s(r["cpu_median_s"]) if "cpu_median_s" in r else "-"
        lines.append(
            f"{name:44s} {_fmt_s(r['median_s']):>10s} {_fmt_s(r['min_s']):>10s} {cpu_s:>10s} "
            f"{r['repeats']:>3d} {peak:>8s}  {', '.join(notes)}"
        )
    for stage, res in report["results"].items():
        extra = {k: v for k, v in res.items() if not (isinstance(v, dict) and "median_s" in v)}
        if extra:
            lines.append(f"{stage}: " + json.dumps(extra, default=str))
    loads = report.get("load_average", {})
    if loads:
        lines.append(
            "load average (1 min) at each stage start/end: "
            + ", ".join(f"{k} {v[0]:.1f}/{v[1]:.1f}" for k, v in loads.items())
        )
    return "\n".join(lines)


def at_reference_conditions(name: str, settings: Dict) -> bool:
    """Whether measurement ``name`` ran in the conditions of :data:`REFERENCE_CPU`."""
    if name == "matrix_nms":
        return settings["nms_masks"] == 500 and tuple(settings["nms_size"]) == (200, 336)
    if not Path(settings["config_file"]).name.startswith("SOLOv2_R50_"):
        return False
    if name.startswith("inference/"):
        candidates_ok = "reference_candidates" not in name or settings["candidates"] == 405
        return tuple(settings["size"]) == (800, 1344) and candidates_ok
    if name.startswith("train/"):
        return (tuple(settings["train_size"]), settings["train_batch"]) == ((640, 832), 2) and (
            settings["train_instances"] == 8
        )
    return False


def _fmt_s(s: float) -> str:
    return f"{s * 1000:.2f} ms" if s < 1 else f"{s:.3f} s"


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
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
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", default=str(REPO / "configs" / "SOLOv2_R50_3x.yaml"))
    p.add_argument("--weights", default="", help="checkpoint to load (default: random init)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=_positive, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--size", type=_size, default=(800, 1344), help="inference input HxW")
    p.add_argument("--batch-sizes", type=_positive, nargs="+", default=[1, 2, 4])
    p.add_argument("--candidates", type=_positive, default=REFERENCE_CANDIDATES)
    p.add_argument("--many-candidates", type=_positive, default=20000)
    p.add_argument("--nms-masks", type=_positive, default=500)
    p.add_argument("--nms-size", type=_size, default=(200, 336))
    p.add_argument("--train-size", type=_size, default=(640, 832))
    p.add_argument("--train-batch", type=_positive, default=2)
    p.add_argument("--train-instances", type=_positive, default=8)
    p.add_argument("--amp", action="store_true", help="also time training under autocast")
    p.add_argument(
        "--channels-last", action="store_true", help="model weights in NHWC memory format"
    )
    p.add_argument("--workers", type=int, default=2, help="data-loader worker processes")
    p.add_argument("--loader-images", type=_positive, default=16)
    p.add_argument("--loader-batch", type=_positive, default=2)
    p.add_argument("--loader-batches", type=_positive, default=10)
    p.add_argument("--repeats", type=_positive, default=5, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--nms-repeats", type=_positive, default=20)
    p.add_argument("--throughput-repeats", type=_positive, default=3)
    p.add_argument("--train-repeats", type=_positive, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-isolate", action="store_true", help="run every stage in this process")
    p.add_argument("--json", metavar="PATH", help="write the full results as JSON")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides")
    p.add_argument("--_child", nargs=2, metavar=("STAGE", "OUT"), help=argparse.SUPPRESS)
    return p


def child_argv(argv: Sequence[str]) -> List[str]:
    """``argv`` without ``--json`` (the parent writes it), for the per-stage subprocesses."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--json":
            skip = True
        elif not a.startswith("--json="):
            out.append(a)
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    if args._child:
        stage, out = args._child
        start_load = os.getloadavg()[0]
        res = run_stage(stage, args)
        res["_load"] = [start_load, os.getloadavg()[0]]
        with open(out, "w") as f:
            json.dump(res, f, default=str)
        return res

    device = torch.device(args.device)
    report = {
        "machine": machine_info(device),
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("_child", "json", "no_isolate")
        },
        "reference_cpu_adelaidet": REFERENCE_CPU,
        "results": {},
        "load_average": {},
    }
    for stage in args.stages:
        if args.no_isolate:
            start_load = os.getloadavg()[0]
            res = run_stage(stage, args)
            res["_load"] = [start_load, os.getloadavg()[0]]
        else:
            res = run_stage_isolated(stage, child_argv(argv))
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
