"""Benchmark stages: each builds what it needs from :class:`BenchmarkSettings` and measures.

Stages (:data:`STAGES`):

* ``inference``: batch 1 at ``size``: preprocessing, backbone+FPN, instance branch, mask-feature
  branch, post-processing (head outputs -> final Instances) and the whole ``model(inputs)``; the
  network's multiply-adds (fvcore's count) and GMAC/s against the machine's practical peak (a
  4096^3 float32 matrix multiply with the same threads, measured in the same run:
  :mod:`.efficiency`).
  The category classifier's bias is set so that one class passes the score threshold in every
  grid cell (random weights give no detections otherwise); the candidates left after points NMS
  are reported. Post-processing is also timed with category scores built to leave exactly
  ``candidates`` candidates.
* ``throughput``: images/s of ``model(inputs)`` for each of ``batch_sizes`` same-size images.
* ``matrix_nms``: Matrix NMS alone on ``nms_masks`` masks of ``nms_size``.
* ``postprocess_memory``: post-processing with ``candidates`` and ``many_candidates`` candidates:
  time and peak memory (bounded by ``MODEL.SOLO.INFERENCE_CHUNK_SIZE``).
* ``train``: forward+backward of ``train_batch`` images of ``train_size`` with
  ``train_instances`` instances each; the grid assignment of that batch alone
  (``model.criterion.assign_targets``), and the per-image target work done in the mapper workers.
* ``levers``: whole inference and a training step with each speed lever (channels-last,
  folded FrozenBatchNorm) on and off, interleaved in one process (:mod:`.levers`).
* ``loader``: data-loader throughput (SOLODatasetMapper, ``workers`` processes) on a generated
  shapes dataset with COCO-like image sizes.

Every stage calls the functions it times directly. Weights are random unless ``weights`` is
given: speed does not depend on their values, only on the candidates they produce.
"""

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from solo_d2.config import load_config
from solo_d2.engine import load_model
from solo_d2.modeling.heads import split_instance_features
from solo_d2.modeling.meta_arch import HeadOutputs
from solo_d2.modeling.postprocessing import matrix_nms

from .efficiency import gmac, network_efficiency
from .inputs import (
    candidate_logits,
    count_candidates,
    inference_inputs,
    mapper_targets,
    matrix_nms_inputs,
    training_inputs,
)
from .levers import bench_levers
from .timing import measure, summarize, time_fn

__all__ = [
    "STAGES",
    "BenchmarkSettings",
    "build_benchmark_model",
    "one_class_everywhere",
    "postprocess",
    "run_stage",
    "run_stage_isolated",
]

# the repository root: the working directory of isolated stages (``python -m dev.benchmark.child``)
REPO = Path(__file__).resolve().parents[2]

STAGES = (
    "inference",
    "throughput",
    "matrix_nms",
    "postprocess_memory",
    "train",
    "loader",
    "levers",
)


@dataclass
class BenchmarkSettings:
    """What to benchmark and at which sizes (``python -m dev.benchmark`` flags of the same
    names)."""

    config_file: str
    weights: str = ""  # checkpoint to load; "" for random init
    device: str = "cpu"
    threads: Optional[int] = None  # torch.set_num_threads (None: torch's default)
    opts: List[str] = field(default_factory=list)  # config overrides, KEY VALUE pairs
    channels_last: bool = True  # MODEL.SOLO.CHANNELS_LAST: conv weights in NHWC memory format
    seed: int = 0
    size: Tuple[int, int] = (800, 1344)  # inference input (h, w)
    batch_sizes: List[int] = field(default_factory=lambda: [1, 2, 4])
    candidates: int = 405  # post-processing candidates, the number in AdelaiDet's published run
    many_candidates: int = 20000
    nms_masks: int = 500
    nms_size: Tuple[int, int] = (200, 336)
    matmul_size: int = 4096  # n of the n x n x n float32 matmul giving the machine's peak GMAC/s
    train_size: Tuple[int, int] = (640, 832)
    train_batch: int = 2
    train_instances: int = 8
    amp: bool = False  # also time inference and training under autocast
    workers: int = 2  # data-loader worker processes
    loader_images: int = 16
    loader_batch: int = 2
    loader_batches: int = 10
    repeats: int = 5  # timed runs per measurement
    warmup: int = 1
    nms_repeats: int = 20
    throughput_repeats: int = 3
    train_repeats: int = 3

    def config(self) -> CfgNode:
        """The model config: ``config_file`` + ``opts`` on ``device`` with ``weights``."""
        cfg = load_config(self.config_file, self.opts)
        cfg.MODEL.DEVICE = self.device
        cfg.MODEL.WEIGHTS = self.weights
        cfg.MODEL.SOLO.CHANNELS_LAST = self.channels_last
        return cfg


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------
def build_benchmark_model(cfg: CfgNode, seed: int = 0) -> nn.Module:
    """The model of ``cfg`` (random weights from ``seed`` unless MODEL.WEIGHTS), in eval mode."""
    torch.manual_seed(seed)
    return load_model(cfg)[0]


def one_class_everywhere(model: nn.Module, class_index: int = 0) -> None:
    """Set the classifier so that class ``class_index`` passes the score threshold in every cell.

    Its bias becomes 0 (probability 0.5 before the weights' contribution); with random weights
    (normal, std 0.01) the logits then stay well above logit(SCORE_THRESH_TEST); the other classes
    keep the prior bias (probability 0.01, below the threshold).
    """
    with torch.no_grad():
        model.ins_head.cate_pred.bias[class_index] = 0.0


def postprocess(
    model: nn.Module, images: ImageList, outputs: HeadOutputs, batched_inputs: List[Dict]
) -> List[Instances]:
    """``model.postprocess`` (inference after the network), as a list of Instances."""
    return [r["instances"] for r in model.postprocess(images, outputs, batched_inputs)]


# ------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------
def _amp_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def bench_inference(model: nn.Module, s: BenchmarkSettings, device: torch.device) -> Dict:
    """Per-stage latency of one image at ``s.size`` and of the whole ``model(inputs)``."""
    h, w = s.size
    inputs = inference_inputs(1, h, w, seed=s.seed)
    timing = {"repeats": s.repeats, "warmup": s.warmup, "device": device}
    threshold = model.inference_args["score_threshold"]
    res = {}
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        x = images.tensor
        res["preprocess"] = measure(lambda: model.preprocess_image(inputs), **timing)
        backbone = model.inference_backbone()  # what inference runs (FrozenBN folded)
        res["backbone_fpn"] = measure(lambda: backbone(x), **timing)
        features = backbone(x)
        ins_feats = [features[f] for f in model.instance_in_features]
        res["instance_branch"] = measure(
            lambda: model.ins_head(split_instance_features(ins_feats)), **timing
        )
        if model.mask_head is not None:
            mask_feats = [features[f] for f in model.mask_in_features]
            res["mask_feature_branch"] = measure(lambda: model.mask_head(mask_feats), **timing)
        outputs = model.predict(x)
        logits = candidate_logits(
            model.ins_head.num_grids,
            model.ins_head.num_classes,
            s.candidates,
            seed=s.seed,
            device=device,
        )
        for name, outs in (
            ("postprocess", outputs),
            ("postprocess_fixed_candidates", (logits, *outputs[1:])),
        ):
            res[name] = measure(
                lambda outs=outs: postprocess(model, images, outs, inputs), **timing
            )
            res[name]["candidates"] = count_candidates(outs[0], threshold)[0]
            res[name]["detections"] = len(postprocess(model, images, outs, inputs)[0])
        res["total"] = measure(lambda: model(inputs), **timing)
        res["total"]["candidates"] = res["postprocess"]["candidates"]
        parts = {
            "backbone_fpn": gmac(backbone, x),
            "instance_branch": gmac(model.ins_head, split_instance_features(ins_feats)),
        }
        if model.mask_head is not None:
            parts["mask_feature_branch"] = gmac(model.mask_head, mask_feats)
        res["network"] = network_efficiency(
            parts, {k: res[k]["median_s"] for k in parts}, device, s.matmul_size
        )
        if s.amp:  # the whole inference under autocast (float16 on CUDA, bfloat16 on the CPU)
            with torch.autocast(device.type, dtype=_amp_dtype(device)):
                res["total_amp"] = measure(lambda: model(inputs), **timing)
                res["total_amp"]["detections"] = len(model(inputs)[0]["instances"])
            res["total"]["detections"] = len(model(inputs)[0]["instances"])
    res["input"] = {
        "batch": 1,
        "height": h,
        "width": w,
        "padded": list(x.shape[-2:]),
    }
    return res


def bench_throughput(model: nn.Module, s: BenchmarkSettings, device: torch.device) -> Dict:
    """Images/s of ``model(inputs)`` for batches of ``s.batch_sizes`` images of ``s.size``."""
    h, w = s.size
    res = {}
    with torch.no_grad():
        for b in s.batch_sizes:
            inputs = inference_inputs(b, h, w, seed=s.seed)
            r = measure(
                lambda inputs=inputs: model(inputs),
                repeats=s.throughput_repeats,
                warmup=1,
                device=device,
            )
            r["images_per_s"] = b / r["median_s"]
            r["batch"] = b
            res[f"batch{b}"] = r
    res["input"] = {"height": h, "width": w}
    return res


def bench_matrix_nms(s: BenchmarkSettings, device: torch.device) -> Dict:
    """Matrix NMS alone on ``s.nms_masks`` bool masks of ``s.nms_size``."""
    h, w = s.nms_size
    labels, masks, areas, scores = matrix_nms_inputs(s.nms_masks, h, w, s.seed, device)
    r = measure(
        lambda: matrix_nms(labels, masks, areas, scores),
        repeats=s.nms_repeats,
        warmup=max(s.warmup, 1),
        device=device,
    )
    r.update(masks=s.nms_masks, height=h, width=w, dtype=str(masks.dtype))
    return {"matrix_nms": r}


def bench_postprocess_memory(model: nn.Module, s: BenchmarkSettings, device: torch.device) -> Dict:
    """Post-processing time and peak memory with ``s.candidates`` and ``s.many_candidates``
    candidates (memory should not grow with the candidates: they are scored in chunks)."""
    h, w = s.size
    inputs = inference_inputs(1, h, w, seed=s.seed)
    res = {}
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        outputs = model.predict(images.tensor)
        for name, n in (("few", s.candidates), ("many", s.many_candidates)):
            logits = candidate_logits(
                model.ins_head.num_grids, model.ins_head.num_classes, n, seed=s.seed, device=device
            )
            outs = (logits, *outputs[1:])
            r = measure(
                lambda outs=outs: postprocess(model, images, outs, inputs),
                repeats=1,
                warmup=0,
                device=device,
            )
            r["candidates"] = count_candidates(logits, model.inference_args["score_threshold"])[0]
            res[name] = r
    hf, wf = outputs[2].shape[-2:] if outputs[2] is not None else (h // 4, w // 4)
    res["unchunked_soft_masks_mb"] = round(s.many_candidates * hf * wf * 4 / 2**20, 1)
    res["chunk_size"] = model.inference_args["chunk_size"]
    res["input"] = {"batch": 1, "height": h, "width": w}
    return res


def bench_train(model: nn.Module, s: BenchmarkSettings, device: torch.device) -> Dict:
    """A training step (forward+backward), under autocast too with ``s.amp``; the grid assignment
    of its batch and the mapper's per-image target work, each timed alone."""
    h, w = s.train_size
    inputs, masks = training_inputs(model, s.train_batch, h, w, s.train_instances, seed=s.seed)
    inputs = [{"image": x["image"], "instances": x["instances"].to(device)} for x in inputs]
    amp_dtype = _amp_dtype(device)
    model.train()
    res = {}

    def step(amp: bool) -> Dict[str, float]:
        model.zero_grad(set_to_none=True)
        with EventStorage(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            losses = model(inputs)
        sum(losses.values()).backward()
        return {k: float(v.detach()) for k, v in losses.items()}

    for amp in [False, True] if s.amp else [False]:
        key = "forward_backward_amp" if amp else "forward_backward"
        res[key] = measure(
            lambda amp=amp: step(amp), repeats=s.train_repeats, warmup=1, device=device
        )
        res[key]["losses"] = step(amp)
    if s.amp:
        ref, amp_losses = res["forward_backward"]["losses"], res["forward_backward_amp"]["losses"]
        res["amp_check"] = {
            "finite": all(math.isfinite(v) for v in amp_losses.values()),
            "max_rel_diff": max(abs(amp_losses[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in ref),
        }

    # the assignment alone, on the same ground truth (what the model does once per batch)
    gt = [x["instances"] for x in inputs]
    canvas = tuple(model.preprocess_image(inputs).tensor.shape[-2:])
    res["grid_assignment"] = time_fn(
        lambda: model.criterion.assign_targets(gt, canvas),
        repeats=max(s.repeats, 20),
        warmup=2,
        device=device,
    )
    _, positives = model.criterion.assign_targets(gt, canvas)
    res["grid_assignment"]["positive_samples"] = sum(len(p) for p in positives)
    res["mapper_targets_per_image"] = time_fn(
        lambda: mapper_targets(model, masks[0]),
        repeats=max(s.repeats, 5),
        warmup=1,
        device=torch.device("cpu"),
    )
    model.eval()
    res["input"] = {
        "batch": s.train_batch,
        "height": h,
        "width": w,
        "instances_per_image": s.train_instances,
        "amp_dtype": str(amp_dtype).replace("torch.", "") if s.amp else None,
    }
    return res


def bench_loader(cfg: CfgNode, s: BenchmarkSettings) -> Dict:
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
            tmp, "bench", s.loader_images, seed=s.seed, min_size=480, max_size=640
        )
        res["dataset_generation_s"] = time.perf_counter() - start
        name = f"solo_benchmark_{os.getpid()}"
        DatasetCatalog.register(name, lambda: load_coco_json(json_file, f"{tmp}/bench", name))
        MetadataCatalog.get(name).set(thing_classes=list(SHAPES_CLASSES))
        try:
            cfg.defrost()
            cfg.DATASETS.TRAIN = (name,)
            cfg.SOLVER.IMS_PER_BATCH = s.loader_batch
            cfg.DATALOADER.NUM_WORKERS = s.workers
            mapper = SOLODatasetMapper(cfg, True)
            dicts = DatasetCatalog.get(name)
            res["mapper_per_image"] = time_fn(
                lambda: mapper(copy.deepcopy(dicts[0])),
                repeats=max(s.repeats, 5),
                warmup=1,
                device=torch.device("cpu"),
            )
            loader = iter(build_detection_train_loader(cfg, mapper=mapper))
            start = time.perf_counter()
            next(loader)
            res["first_batch_s"] = time.perf_counter() - start
            times = []
            for _ in range(s.loader_batches):
                start = time.perf_counter()
                batch = next(loader)
                times.append(time.perf_counter() - start)
        finally:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        res["batch"] = summarize(times)
        res["images_per_s"] = s.loader_batch * len(times) / sum(times)
        res["input"] = {
            "images": s.loader_images,
            "batch": s.loader_batch,
            "workers": s.workers,
            "image_short_side": [480, 640],
            "min_size_train": list(cfg.INPUT.MIN_SIZE_TRAIN),
            "example_batch_shapes": [list(x["image"].shape) for x in batch],
        }
    return res


def run_stage(stage: str, s: BenchmarkSettings) -> Dict:
    """Run one stage of :data:`STAGES` in this process; its measurements as a dict."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
    device = torch.device(s.device)
    if stage == "matrix_nms":
        return bench_matrix_nms(s, device)
    cfg = s.config()
    if stage == "loader":
        return bench_loader(cfg, s)
    model = build_benchmark_model(cfg, seed=s.seed)
    if stage == "train":
        return bench_train(model, s, device)
    one_class_everywhere(model)
    if stage == "levers":
        return bench_levers(model, cfg, s, device)
    if stage == "inference":
        return bench_inference(model, s, device)
    if stage == "throughput":
        return bench_throughput(model, s, device)
    return bench_postprocess_memory(model, s, device)


def run_stage_in_child(stage: str, settings_json: str, out_json: str) -> None:
    """The child process of :func:`run_stage_isolated` (``python -m dev.benchmark.child``): run
    ``stage`` and write its results and the load average at its start and end (``_load``) to
    ``out_json``."""
    with open(settings_json) as f:
        s = BenchmarkSettings(**json.load(f))
    if s.threads:
        torch.set_num_threads(s.threads)
    start_load = os.getloadavg()[0]
    res = run_stage(stage, s)
    res["_load"] = [start_load, os.getloadavg()[0]]
    with open(out_json, "w") as f:
        json.dump(res, f, default=str)


def run_stage_isolated(stage: str, s: BenchmarkSettings) -> Dict:
    """Run one stage in a fresh Python process (its own memory high-water mark and no state
    left by other stages), ``python -m dev.benchmark.child`` in the repository root; returns what
    :func:`run_stage` returns, with ``_load``."""
    settings = dataclasses.asdict(s)
    # the child runs in the repository root: the files named must not depend on this cwd
    settings["config_file"] = os.path.abspath(s.config_file)
    if s.weights and "://" not in s.weights:
        settings["weights"] = os.path.abspath(s.weights)
    with tempfile.TemporaryDirectory(prefix="solo_bench_") as tmp:
        settings_json, out = os.path.join(tmp, "settings.json"), os.path.join(tmp, "stage.json")
        with open(settings_json, "w") as f:
            json.dump(settings, f)
        proc = subprocess.run(
            [sys.executable, "-m", "dev.benchmark.child", stage, settings_json, out], cwd=REPO
        )
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark stage {stage!r} failed (exit {proc.returncode})")
        with open(out) as f:
            return json.load(f)
