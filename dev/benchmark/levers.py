"""The speed levers of inference and training, measured side by side in one process.

Each lever is a config setting (``MODEL.SOLO.CHANNELS_LAST``, ``MODEL.SOLO.FOLD_FROZEN_BN``).
One model is built per combination, all with the same weights; the whole ``model(inputs)`` of
each is then timed in interleaved rounds (A B C D, then D C B A, ...), so that a slow moment of
the machine or the warm-up order does not favour one of them, and the medians are compared with
the combination where every lever is off. The detections of each are compared with those of
that combination too (:func:`~solo_d2.export.compare.compare_detections`: scores within 1e-3,
mask IoU >= 0.99). Training: a forward+backward step with and without channels-last, in the same
interleaved way, with the losses compared.
"""

import itertools
import time
from typing import Callable, Dict, List, Tuple

import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn

from solo_d2.export.compare import compare_detections

from .inputs import inference_inputs, training_inputs
from .timing import summarize, synchronize

__all__ = ["INFERENCE_LEVERS", "bench_levers", "interleaved_times"]

# (name, {config key: value}): every combination of the two levers, all off first
INFERENCE_LEVERS: Tuple[Tuple[str, Dict[str, bool]], ...] = tuple(
    (
        "+".join(n for n, on in (("channels_last", cl), ("fold_frozen_bn", fold)) if on) or "none",
        {"CHANNELS_LAST": cl, "FOLD_FROZEN_BN": fold},
    )
    for cl, fold in itertools.product((False, True), repeat=2)
)


def interleaved_times(
    fns: Dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> Dict[str, Dict]:
    """Time every function ``repeats`` times in rounds that alternate their order (forward, then
    backward), after one warm-up call each; :func:`~.timing.summarize` of each one's times."""
    names = list(fns)
    for name in names:
        fns[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: summarize(t) for name, t in times.items()}


def _lever_model(base: nn.Module, cfg, levers: Dict[str, bool]) -> nn.Module:
    """A model of ``cfg`` with ``levers`` set and ``base``'s weights."""
    cfg = cfg.clone()
    cfg.defrost()
    for key, value in levers.items():
        cfg.MODEL.SOLO[key] = value
    model = build_model(cfg)
    model.load_state_dict(base.state_dict())
    return model.eval()


def bench_levers(base: nn.Module, cfg, s, device: torch.device) -> Dict:
    """Whole inference at ``s.size`` for each of :data:`INFERENCE_LEVERS`, and a training step
    with and without channels-last, interleaved; ratios to the all-off combination.

    Args:
        base: a model of ``cfg`` whose weights every combination copies (the classifier set so
            that cells pass the score threshold, see :func:`~.stages.one_class_everywhere`).
        s: :class:`~.stages.BenchmarkSettings` (``size``, ``repeats``, ``train_size``,
            ``train_batch``, ``train_instances``, ``train_repeats``, ``seed``).
    """
    h, w = s.size
    inputs = inference_inputs(1, h, w, seed=s.seed)
    models = {name: _lever_model(base, cfg, levers) for name, levers in INFERENCE_LEVERS}
    res = {}
    with torch.no_grad():
        outputs = {name: m(inputs)[0]["instances"] for name, m in models.items()}
        timed = interleaved_times(
            {name: (lambda m=m: m(inputs)) for name, m in models.items()}, s.repeats, device
        )
    ref_name = INFERENCE_LEVERS[0][0]
    ref = outputs[ref_name].to("cpu")
    for name, r in timed.items():
        got = outputs[name].to("cpu")
        agreement = compare_detections(ref, got.scores, got.pred_classes, got.pred_masks)
        r["ratio"] = r["median_s"] / timed[ref_name]["median_s"]
        r["detections"] = len(got)
        r["max_score_diff"] = agreement.max_score_diff
        r["min_mask_iou"] = agreement.min_mask_iou
        r["same_classes"] = agreement.same_classes
        res[f"inference_{name}"] = r
    del models

    # training: channels-last on and off (folding applies to inference only)
    th, tw = s.train_size
    train_inputs, _ = training_inputs(base, s.train_batch, th, tw, s.train_instances, seed=s.seed)
    train_inputs = [
        {"image": x["image"], "instances": x["instances"].to(device)} for x in train_inputs
    ]
    losses = {}

    def step(model: nn.Module, name: str) -> None:
        model.zero_grad(set_to_none=True)
        with EventStorage():
            out = model(train_inputs)
        sum(out.values()).backward()
        losses[name] = {k: float(v.detach()) for k, v in out.items()}

    trainers = {}
    for cl in (False, True):
        model = _lever_model(base, cfg, {"CHANNELS_LAST_TRAIN": cl})
        trainers["channels_last" if cl else "none"] = model.train()
    timed = interleaved_times(
        {name: (lambda m=m, name=name: step(m, name)) for name, m in trainers.items()},
        s.train_repeats,
        device,
    )
    for name, r in timed.items():
        r["ratio"] = r["median_s"] / timed["none"]["median_s"]
        r["max_loss_rel_diff"] = max(
            abs(losses[name][k] - v) / max(abs(v), 1e-12) for k, v in losses["none"].items()
        )
        res[f"train_step_{name}"] = r
    res["input"] = {"height": h, "width": w, "train": [s.train_batch, th, tw]}
    return res
