"""A fitted config checked by measurement: short trainings on the user's data decide what
``tools/analyze_dataset.py --fit OUT.yaml --trials ITERS`` writes.

The fit's rules (:mod:`solo_d2.visualization.dataset_fit`) are hypotheses chosen on datasets made
alongside them; on a dataset they were never shown, a rule can make the model worse. So the
trial stage trains, for the same short budget, the config the user started from and a few
fitted candidates (:func:`trial_candidates`):

* ``start``: the base config as it is, with only the dataset's class counts set (what preflight
  requires to train it at all);
* ``start_reseeded``: the same with the next seed: how far two trainings of one config differ
  at this budget on this validation split (the trials' noise, measured rather than assumed);
* ``fit``: every value the rules propose;
* ``fit_base_levels``: the fit's resizes, with the base's scale ranges and centre region and the
  base's grids scaled with the resize only (the range choice undone);
* ``fit_finer_grids``: the fit with 1.5x its grids, capped at the feature resolution (the grid
  choice pushed the other way: fewer objects sharing a cell, fewer samples per cell).

Candidates whose values equal an earlier one's are trained once. Each trial trains ``ITERS``
iterations (cosine decay over them, the base's optimiser, batch and seed; seed 0 where the base
draws one) on the training split and evaluates on the validation split: the user's
(``--val-dataset``), else a deterministic held-out share of the training images
(:func:`holdout_split`: ranked by a hash of each image's file name and id, so the same images on
every machine and in every run). The metric follows the dataset kind (:func:`trial_metric`):
mask AP (COCO), LVIS's mask AP, PQ (panoptic). For panoptic data each trained candidate is also
evaluated at several instance paste thresholds (``PANOPTIC_THRESHOLDS``) and keeps its best one.

The written config is the start's unless a fitted candidate beats the start's mean over its two
seeds by more than the larger of ``margin`` points and the two seeds' difference (:func:`choose`):
then the best one's. The start is always trained, so at the trial budget the written config is
never worse on the validation split than either training of the one the user started from. A
candidate that fails to train (a config the checks refuse, an exception in training) is reported
with its error and skipped.
"""

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.env import seed_all_rng

from ..atomic_io import atomic_write_json
from ..config import DEFAULT_MAX_IMAGE_PIXELS
from ..data.record import dataset_record
from ..kinds import DatasetKind, get_kind, kind_of, register_dataset
from ..modeling import is_panoptic
from ..visualization.dataset_fit import ConfigFit, config_value, grid_caps, scale_grids

__all__ = [
    "TRIAL_KEYS",
    "Candidate",
    "TrialResult",
    "candidate_values",
    "trial_candidates",
    "holdout_split",
    "split_dataset",
    "trial_config",
    "trial_metric",
    "evaluation_results",
    "run_trial",
    "run_trials",
    "training_progress",
    "start_noise",
    "choose",
    "format_trials",
    "trials_record",
]

logger = logging.getLogger(__name__)

VAL_FRACTION = 0.2  # share of the training images held out when no validation set is given
MARGIN = 0.5  # points (AP or PQ) a fitted candidate must win by to replace the start
FINER_GRIDS = 1.5
PANOPTIC_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)
THRESH_KEY = "MODEL.SOLO.PANOPTIC.INSTANCES_CONFIDENCE_THRESH"
RESEEDED = "start_reseeded"  # the start config with another seed: the trials' noise
# the values a candidate is told apart by (the trial table's columns)
TRIAL_KEYS = (
    "INPUT.MIN_SIZE_TEST",
    "INPUT.MIN_SIZE_TRAIN",
    "MODEL.SOLO.FPN_SCALE_RANGES",
    "MODEL.SOLO.NUM_GRIDS",
    "MODEL.SOLO.SIGMA",
)
# ... and, where tiles are on (the fit's or the base's), the tiles' (a tiled fit keeps the
# base's resizes and levels: without these it would read as a repeat of the start)
TILE_TRIAL_KEYS = ("INPUT.TILE.TRAIN", "INPUT.TILE.SIZE", "INPUT.TILE.SCALE")
# keys every candidate keeps from the fit: the dataset itself, not a choice
_DATASET_KEYS = (
    "DATASETS.TRAIN",
    "DATASETS.TEST",
    "MODEL.SOLO.NUM_CLASSES",
    "MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES",
)
_LEVEL_KEYS = ("MODEL.SOLO.FPN_SCALE_RANGES", "MODEL.SOLO.NUM_GRIDS", "MODEL.SOLO.SIGMA")


@dataclass
class Candidate:
    """A config to try: ``fit`` holds the keys it sets over the base config."""

    name: str
    description: str
    fit: ConfigFit


@dataclass
class TrialResult:
    """One trial: the candidate, its key values, the validation metric and the time it took."""

    candidate: str
    description: str
    values: Dict[str, object]
    metric_name: str = ""
    metric: Optional[float] = None  # None: failed (``error`` says why)
    seconds: float = 0.0
    error: Optional[str] = None
    thresholds: Dict[str, float] = field(default_factory=dict)  # panoptic: PQ per threshold


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def candidate_values(cfg: CfgNode, fit: ConfigFit) -> Dict[str, object]:
    """The :data:`TRIAL_KEYS` of the base ``cfg`` with ``fit``'s changes over it."""
    out = {}
    tiled = "INPUT.TILE.TRAIN" in fit.changes or cfg.INPUT.TILE.TRAIN
    for key in TRIAL_KEYS + (TILE_TRIAL_KEYS if tiled else ()):
        value = fit.changes[key][0] if key in fit.changes else config_value(cfg, key)
        out[key] = _plain(value)
    return out


def _derived(fit: ConfigFit, keep: Sequence[str] = ()) -> ConfigFit:
    """A copy of ``fit`` with the dataset keys and ``keep`` (all keys when ``keep`` is "all")."""
    out = ConfigFit(base_config=fit.base_config, dataset=fit.dataset)
    for key, (value, comment) in fit.changes.items():
        if key in _DATASET_KEYS or keep == "all" or key in keep:
            out.set(key, value, comment)
    return out


def trial_candidates(
    cfg: CfgNode, fit: ConfigFit, opts_keys: Sequence[str] = ()
) -> List[Candidate]:
    """The start config and the fitted candidates around the rules' proposal (module docstring),
    without repeats.

    Args:
        cfg: the base config (with the user's ``--opts``).
        fit: the rules' :class:`ConfigFit` of it.
        opts_keys: keys the user set with ``--opts``: every candidate keeps them.
    """
    start = _derived(fit, keep=tuple(opts_keys))
    full = _derived(fit, keep="all")
    sc = cfg.MODEL.SOLO
    test_short = int(full.changes.get("INPUT.MIN_SIZE_TEST", (cfg.INPUT.MIN_SIZE_TEST,))[0])
    strides = list(sc.FPN_INSTANCE_STRIDES)
    if "MODEL.SOLO.FPN_INSTANCE_STRIDES" in full.changes:
        strides = list(full.changes["MODEL.SOLO.FPN_INSTANCE_STRIDES"][0])
    caps = grid_caps(test_short, strides)

    base_levels = _derived(fit, keep=[k for k in fit.changes if k not in _LEVEL_KEYS])
    base_levels.set(
        "MODEL.SOLO.NUM_GRIDS",
        scale_grids(sc.NUM_GRIDS, test_short / cfg.INPUT.MIN_SIZE_TEST, caps),
        f"base grids x {test_short}/{cfg.INPUT.MIN_SIZE_TEST} (the resize only), capped at "
        "test size / stride; base scale ranges and SIGMA",
    )
    finer = _derived(fit, keep="all")
    fit_grids = candidate_values(cfg, full)["MODEL.SOLO.NUM_GRIDS"]
    finer.set(
        "MODEL.SOLO.NUM_GRIDS",
        scale_grids(fit_grids, FINER_GRIDS, caps),
        f"the fit's grids {fit_grids} x {FINER_GRIDS:g}, capped at test size / stride",
    )
    made = [
        Candidate("start", "the base config as it is (class counts set)", start),
        Candidate("fit", "the rules' proposal (every fitted value)", full),
        Candidate(
            "fit_base_levels",
            "the fit's resizes; the base's ranges, SIGMA, grids scaled with the resize",
            base_levels,
        ),
        Candidate("fit_finer_grids", f"the fit with {FINER_GRIDS:g}x its grids", finer),
    ]
    if "MODEL.SOLO.INSTANCE_IN_FEATURES" in fit.changes:  # --fit-model dropped levels: the
        made.pop(2)  # base's per-level ranges no longer fit the kept levels
    out, seen = [], []
    for candidate in made:
        values = candidate_values(cfg, candidate.fit)
        if values not in seen:
            seen.append(values)
            out.append(candidate)
    reseeded = _derived(start, keep="all")
    seed = cfg.SEED if cfg.SEED >= 0 else 0
    reseeded.set("SEED", seed + 1, "the start's seed + 1: the trials' noise")
    out.insert(1, Candidate(RESEEDED, "the base config again, another seed (the noise)", reseeded))
    return out


def holdout_split(
    keys: Sequence[str], fraction: float = VAL_FRACTION
) -> Tuple[List[int], List[int]]:
    """A deterministic split of images into training and held-out validation indices.

    Images are ranked by the SHA-1 of their key (file name and id): the same images are held
    out on every machine, in every run and whatever the order of the file.

    Returns:
        (train, val) sorted index lists; val has ``round(fraction * n)`` images, at least one,
        and train at least one.
    Raises:
        ValueError: fewer than two images.
    """
    n = len(keys)
    if n < 2:
        raise ValueError(
            f"a held-out validation split needs at least 2 images, the dataset has {n}"
        )
    n_val = min(n - 1, max(1, int(round(fraction * n))))
    rank = sorted(range(n), key=lambda i: hashlib.sha1(keys[i].encode()).hexdigest())
    val = sorted(rank[:n_val])
    held = set(val)
    return [i for i in range(n) if i not in held], val


def _image_key(image: dict) -> str:
    name = os.path.basename(str(image.get("file_name") or image.get("coco_url") or ""))
    return f"{name}#{image.get('id')}"


def split_dataset(name: str, out_dir: str, fraction: float = VAL_FRACTION) -> Tuple[str, str]:
    """Hold out a share of the registered dataset ``name`` (:func:`holdout_split`).

    The dataset's annotation file (COCO, LVIS or COCO panoptic) is written again as two files in
    ``out_dir``, images and annotations split by image, and each is registered as a spec of its
    kind (checked as the user's would be), named ``<name>_trial_train`` and ``<name>_trial_val``.

    Returns:
        the two registered names.
    Raises:
        ValueError: the dataset has no annotation file on record (give ``--val-dataset``), or
            too few images.
    """
    kind = kind_of(name)
    source = kind.annotation_file(name)
    if source is None:
        raise ValueError(
            f"dataset {name!r} has no annotation file on record to hold images out of; give a "
            "validation set with --val-dataset"
        )
    with open(source) as f:
        data = json.load(f)
    images = data.get("images") or []
    train_idx, val_idx = holdout_split([_image_key(im) for im in images], fraction)
    os.makedirs(out_dir, exist_ok=True)
    record = dataset_record(name)
    max_pixels = record.max_image_pixels if record is not None else DEFAULT_MAX_IMAGE_PIXELS
    names = []
    for split, idx in (("train", train_idx), ("val", val_idx)):
        ids = {images[i]["id"] for i in idx}
        part = dict(data)
        part["images"] = [images[i] for i in idx]
        part["annotations"] = [a for a in data.get("annotations", []) if a["image_id"] in ids]
        path = os.path.join(out_dir, f"{name}_{split}.json")
        atomic_write_json(path, part)
        split_name = f"{name}_trial_{split}"
        spec = kind.split_spec(name, split_name, path)
        for catalog in (DatasetCatalog, MetadataCatalog):
            if split_name in catalog.list():
                catalog.remove(split_name)  # a new split of a changed file
        names.append(register_dataset(spec, max_pixels))
    return names[0], names[1]


def trial_config(
    cfg: CfgNode,
    candidate: Candidate,
    train_name: str,
    val_name: str,
    iters: int,
    output_dir: str,
) -> CfgNode:
    """The config of one trial: ``cfg`` with the candidate's values, trained ``iters`` iterations
    on ``train_name`` (cosine decay over them) and evaluated on ``val_name`` at the end only.

    Raises:
        ConfigError: a value the config refuses (the trial is reported as failed).
    """
    out = cfg.clone()
    out.defrost()
    pairs = []
    for key, (value, _) in candidate.fit.changes.items():
        pairs += [key, value]
    out.merge_from_list(pairs)
    out.DATASETS.TRAIN = (train_name,)
    out.DATASETS.TEST = (val_name,)
    out.SOLVER.MAX_ITER = int(iters)
    out.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"
    out.SOLVER.STEPS = ()
    out.SOLVER.WARMUP_ITERS = min(int(out.SOLVER.WARMUP_ITERS), max(1, int(iters) // 5))
    out.SOLVER.CHECKPOINT_PERIOD = int(iters)
    out.TEST.EVAL_PERIOD = 0  # evaluated once, after the last iteration
    out.TEST.SAVE_PLOTS = False
    out.TEST.EXPECTED_RESULTS = []
    out.SEED = out.SEED if out.SEED >= 0 else 0  # candidates compared on the same draws
    out.OUTPUT_DIR = os.path.join(output_dir, candidate.name)
    out.freeze()
    return out


def trial_metric(results: dict, kind: DatasetKind) -> Tuple[str, float]:
    """The validation metric of a dataset kind from evaluation results, and its name: mask AP
    (COCO), LVIS's mask AP, PQ (panoptic); 0 where the evaluation has no number (no
    prediction)."""
    return kind.metric_name, kind.metric(results)


def evaluation_results(storage) -> Dict[str, Dict[str, float]]:
    """The last evaluation's results, nested as the evaluators return them ({"segm": {"AP":
    ...}}), from a trainer's EventStorage: detectron2's EvalHook puts them there flattened
    ("segm/AP"); ``DefaultTrainer.train`` returns them only when ``TEST.EXPECTED_RESULTS`` is
    set."""
    out: Dict[str, Dict[str, float]] = {}
    for key, (value, _) in storage.latest().items():
        task, _, metric = key.partition("/")
        if metric:
            out.setdefault(task, {})[metric] = float(value)
    return out


def _panoptic_sweep(trainer, cfg: CfgNode, val_name: str, own: float) -> Dict[str, float]:
    """PQ on ``val_name`` at each of PANOPTIC_THRESHOLDS (``own``: the trained config's, already
    evaluated), with the trained weights."""
    from ..evaluation import SOLOPanopticEvaluator
    from .trainer import Trainer

    table = {}
    state = trainer.model.state_dict()
    current = float(config_value(cfg, THRESH_KEY))
    for t in PANOPTIC_THRESHOLDS:
        if math.isclose(t, current):
            table[f"{t:g}"] = own
            continue
        swept = cfg.clone()
        swept.defrost()
        swept.merge_from_list([THRESH_KEY, t])
        swept.freeze()
        model = Trainer.build_model(swept)
        model.load_state_dict(state)
        folder = os.path.join(cfg.OUTPUT_DIR, f"inference_thresh_{t:g}")
        evaluator = SOLOPanopticEvaluator(val_name, output_dir=folder)
        results = Trainer.test(swept, model, evaluators=[evaluator])
        table[f"{t:g}"] = get_kind("panoptic").metric(results)
    return table


def _error_line(e: BaseException) -> str:
    """A failed trial's error as one line (the trial table's cell)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]


def run_trial(cfg: CfgNode, candidate: Candidate, kind: DatasetKind, val_name: str) -> TrialResult:
    """Train and evaluate one candidate (``cfg``: its :func:`trial_config`); a failure is
    returned as the result's ``error``, not raised."""
    from .trainer import Trainer

    result = TrialResult(candidate.name, candidate.description, {})
    begin = time.perf_counter()
    trainer = None
    try:
        seed_all_rng(cfg.SEED)  # as train_net.py's default_setup: each trial draws the same
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        result.metric_name, result.metric = trial_metric(evaluation_results(trainer.storage), kind)
        if is_panoptic(cfg):  # a panoptic model: its paste threshold swept too
            result.thresholds = _panoptic_sweep(trainer, cfg, val_name, result.metric)
            best = max(result.thresholds, key=lambda t: result.thresholds[t])
            result.metric = result.thresholds[best]
            candidate.fit.set(
                THRESH_KEY,
                float(best),
                "best PQ on the validation split of the trials: "
                + ", ".join(f"{v:.1f} at {t}" for t, v in result.thresholds.items()),
            )
    except Exception as e:  # noqa: BLE001 - any failure of one candidate is reported, skipped
        result.metric = None
        result.error = _error_line(e)
        logger.warning(f"trial {candidate.name!r} failed: {result.error}")
    finally:
        result.seconds = round(time.perf_counter() - begin, 1)
        _drop_checkpoints(cfg.OUTPUT_DIR)
        del trainer  # its model, optimiser and loader workers, before the next trial's
        gc.collect()
    return result


def _drop_checkpoints(folder: str) -> None:
    """Remove a trial's checkpoints (only its metric is kept): trials leave logs, not weights."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.endswith(".pth") or name == "last_checkpoint":
            os.remove(os.path.join(folder, name))
    for name in os.listdir(folder):  # per-threshold inference folders of the sweep
        if name.startswith("inference_thresh_"):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


@contextlib.contextmanager
def training_progress(log_file: str):
    """Training's log lines (detectron2's and the package's, INFO and up) on stdout and in
    ``log_file`` while the trials run, as ``train_net.py`` shows them; the loggers are restored
    afterwards (no handler is left behind)."""
    formatter = logging.Formatter("[%(asctime)s %(name)s]: %(message)s", "%m/%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout), logging.FileHandler(log_file)]
    loggers = [logging.getLogger(name) for name in ("detectron2", "solo_d2", "fvcore")]
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    for handler in handlers:
        handler.setFormatter(formatter)
    for lg in loggers:
        lg.setLevel(logging.INFO)
        lg.propagate = False
        for handler in handlers:
            lg.addHandler(handler)
    try:
        yield
    finally:
        for lg, level, propagate in saved:
            for handler in handlers:
                lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
        handlers[1].close()


def run_trials(
    cfg: CfgNode,
    candidates: Sequence[Candidate],
    train_name: str,
    val_name: str,
    iters: int,
    output_dir: str,
    progress: Callable[[str], None] = print,
) -> List[TrialResult]:
    """Train and evaluate every candidate in turn (:func:`run_trial`); ``progress`` gets a line
    before and after each (training itself logs as ``train_net.py`` does)."""
    kind = kind_of(val_name)
    results = []
    for i, candidate in enumerate(candidates, 1):
        values = candidate_values(cfg, candidate.fit)
        progress(
            f"trial {i}/{len(candidates)} {candidate.name!r}: {candidate.description}; "
            f"{iters} iterations on {train_name!r}, evaluated on {val_name!r}"
        )
        try:
            trial_cfg = trial_config(cfg, candidate, train_name, val_name, iters, output_dir)
        except Exception as e:  # noqa: BLE001 - a value the config refuses: this trial fails
            result = TrialResult(candidate.name, candidate.description, values)
            result.error = _error_line(e)
        else:
            result = run_trial(trial_cfg, candidate, kind, val_name)
        result.values = values
        results.append(result)
        if result.error:
            progress(
                f"trial {candidate.name!r} failed after {result.seconds:g} s, skipped: "
                f"{result.error}"
            )
        else:
            progress(
                f"trial {candidate.name!r}: {result.metric_name} {result.metric:.2f} in "
                f"{result.seconds:g} s"
            )
    return results


def start_noise(results: Sequence[TrialResult]) -> Tuple[Optional[float], float]:
    """The start's metric and the trials' noise: the mean of the start's two seeds and their
    difference (one seed: its metric and 0; none trained: None and 0)."""
    runs = [
        r.metric
        for r in results
        if r.candidate in ("start", RESEEDED) and r.error is None and r.metric is not None
    ]
    if not runs:
        return None, 0.0
    return sum(runs) / len(runs), max(runs) - min(runs)


def choose(results: Sequence[TrialResult], margin: float = MARGIN) -> TrialResult:
    """The trial whose config is written: the start (named "start") unless a fitted candidate
    beats the start's metric (the mean of its two seeds, :func:`start_noise`) by more than the
    larger of ``margin`` and the two seeds' difference: then the best one. The start config
    trained with another seed is never chosen, nor is a failed trial.

    Raises:
        ValueError: every trial failed (their errors are in the message).
    """
    done = [r for r in results if r.error is None and r.metric is not None]
    if not done:
        errors = "; ".join(f"{r.candidate}: {r.error}" for r in results)
        raise ValueError(f"every trial failed to train: {errors}")
    start = next((r for r in done if r.candidate == "start"), None)
    fitted = [r for r in done if r.candidate not in ("start", RESEEDED)]
    best = max(fitted, key=lambda r: r.metric, default=None)  # the first of equals wins
    level, noise = start_noise(done)
    if best is None or (level is not None and best.metric <= level + max(margin, noise)):
        if start is None:
            raise ValueError(
                "the start config failed to train and no fitted candidate beat its reseeded "
                "run: " + "; ".join(f"{r.candidate}: {r.error}" for r in results if r.error)
            )
        return start
    return best


def format_trials(results: Sequence[TrialResult], chosen: TrialResult, iters: int) -> List[str]:
    """The trial table as lines (no comment marks): one row per candidate."""
    level, noise = start_noise(results)
    lines = [
        f"trials: {iters} iterations each, metric on the validation split; chosen: "
        f"{chosen.candidate!r}"
    ]
    if level is not None:
        lines.append(
            f"the start: {level:.2f} (mean of two seeds, {noise:.2f} apart: a fitted candidate "
            "must beat the mean by more than that difference or the margin)"
        )
    for r in results:
        values = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in r.values.items())
        mark = "*" if r is chosen else " "
        score = f"{r.metric_name} {r.metric:.2f}" if r.error is None else f"FAILED ({r.error})"
        extra = ""
        if r.thresholds:
            extra = "; PQ by paste threshold " + ", ".join(
                f"{t}: {v:.1f}" for t, v in r.thresholds.items()
            )
        lines.append(f"{mark} {r.candidate}: {score}, {r.seconds:g} s{extra}; {values}")
    return lines


def trials_record(
    results: Sequence[TrialResult], chosen: TrialResult, **context
) -> Dict[str, object]:
    """The JSON written beside the YAML: the context (datasets, budget, margin) and every trial."""
    level, noise = start_noise(results)
    return {
        **context,
        "chosen": chosen.candidate,
        "start_metric": level,
        "noise": noise,
        "trials": [asdict(r) for r in results],
    }
