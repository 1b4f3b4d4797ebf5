"""Training and evaluation with detectron2's ``DefaultTrainer``: SOLO mapper, COCO evaluation.

Reliability (README "Reliability"):
* :func:`load_config` / :func:`check_config` turn config mistakes (a missing or malformed file, a
  key that does not exist, ``MODEL.SOLO.NUM_CLASSES`` disagreeing with a dataset, an unregistered
  dataset, a missing weights file) into one-line :class:`ConfigError`\\ s before any work starts.
* :class:`Trainer` writes checkpoints atomically (:class:`solo_d2.checkpoint.AtomicCheckpointer`),
  reports or (with ``DATASETS.STRICT``) refuses faulty training data, trims ``metrics.json`` back
  to the resumed iteration, and names the last checkpoint when a loss becomes NaN or infinite.
* :class:`SOLOCOCOEvaluator` evaluates against the checked ground truth, reports its faults,
  writes its files atomically and reports 0 AP, not NaN, when nothing is predicted.
"""

import contextlib
import difflib
import json
import logging
import math
import os
import shutil
from typing import Iterable, List, Sequence

import detectron2.engine.defaults as _d2_defaults
import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from pycocotools.coco import COCO

from .atomic_io import TMP_MARKER, atomic_write_json, remove_stale_temporaries
from .checkpoint import AtomicCheckpointer
from .config import add_solo_config
from .data.dataset_mapper import SOLODatasetMapper
from .data.validation import (
    DatasetError,
    check_coco_dict,
    clean_coco_dict,
    read_coco_json,
    summarize_faults,
)

__all__ = [
    "ConfigError",
    "load_config",
    "merge_config_opts",
    "check_config",
    "SOLOCOCOEvaluator",
    "Trainer",
]

logger = logging.getLogger(__name__)

_d2_create_ddp_model = _d2_defaults.create_ddp_model


def _create_ddp_model(model, **kwargs):
    """detectron2's ``create_ddp_model``, without ``device_ids`` for a model on the CPU.

    detectron2 always passes ``device_ids=[local_rank]``, which DistributedDataParallel rejects
    for CPU modules, so multi-process (GLOO) training on CPU would fail.
    """
    params = next(model.parameters(), None)
    if params is not None and params.device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


# DefaultTrainer.__init__ looks the function up in its own module.
_d2_defaults.create_ddp_model = _create_ddp_model


class ConfigError(ValueError):
    """A config that cannot work; the message is one line saying what to change."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _config_keys(cfg: CfgNode, prefix: str = "") -> List[str]:
    keys = []
    for k, v in cfg.items():
        keys += _config_keys(v, f"{prefix}{k}.") if isinstance(v, CfgNode) else [prefix + k]
    return keys


def _unknown_key_error(source: str, key: str, cfg: CfgNode) -> ConfigError:
    close = difflib.get_close_matches(key, _config_keys(cfg), n=1, cutoff=0.8)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"{source}: config key {key} does not exist{hint}")


def merge_config_opts(cfg: CfgNode, opts: Sequence[str], source: str = "command line") -> None:
    """Merge KEY VALUE ``opts`` into ``cfg``.

    Raises:
        ConfigError: a key does not exist (with the closest existing key suggested), a value has
            the wrong type, or ``opts`` is not a list of KEY VALUE pairs.
    """
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"{source}: config overrides must be KEY VALUE pairs, got {opts}")
    for key, value in zip(opts[::2], opts[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except AssertionError as e:  # "Non-existent key: A.B"
            if "Non-existent key" in str(e):
                raise _unknown_key_error(source, key, cfg) from None
            raise ConfigError(f"{source}: {key} {value}: {_one_line(e)}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{source}: {key} {value}: {_one_line(e)}") from None


def load_config(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """detectron2's config with the SOLO keys, ``config_file`` and ``opts`` merged (not frozen).

    Raises:
        ConfigError: the file is missing or not valid YAML, a key does not exist (with the
            closest existing key suggested), a value has the wrong type, or ``opts`` is not a
            list of KEY VALUE pairs.
    """
    cfg = get_cfg()
    add_solo_config(cfg)
    if not os.path.isfile(config_file):
        raise ConfigError(f"config file {config_file} does not exist")
    try:
        cfg.merge_from_file(config_file)
    except KeyError as e:  # "Non-existent config key: A.B"
        key = str(e.args[0]).rsplit(":", 1)[-1].strip()
        raise _unknown_key_error(f"config file {config_file}", key, cfg) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {config_file} is not valid YAML: {_one_line(e)}") from None
    except (OSError, ValueError, AssertionError, TypeError) as e:  # a missing _BASE_, bad types
        raise ConfigError(f"config file {config_file}: {_one_line(e)}") from None
    merge_config_opts(cfg, opts)
    return cfg


def _resumable(cfg: CfgNode) -> bool:
    return os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))


def check_config(cfg: CfgNode, *, resume: bool = False, check_weights: bool = True) -> None:
    """Check what the config names before any work starts.

    * every dataset of ``DATASETS.TRAIN`` / ``DATASETS.TEST`` is registered;
    * ``MODEL.SOLO.NUM_CLASSES`` equals the number of categories of each of them (when its
      metadata knows ``thing_classes``);
    * with ``check_weights``, a local ``MODEL.WEIGHTS`` file exists (URLs and ``scheme://``
      paths are not fetched here); it is not needed when ``resume`` finds a checkpoint.

    Raises:
        ConfigError: one line naming the key, the value and the fix.
    """
    registered = set(DatasetCatalog.list())
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[key]:
            if name not in registered:
                close = difflib.get_close_matches(name, sorted(registered), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    f"DATASETS.{key} names dataset {name!r}, which is not registered{hint}; "
                    f"register it with --dataset {name}=ANNOTATIONS.json:IMAGE_DIR"
                )
            classes = MetadataCatalog.get(name).get("thing_classes", None)
            if classes is not None and len(classes) != cfg.MODEL.SOLO.NUM_CLASSES:
                shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
                raise ConfigError(
                    f"MODEL.SOLO.NUM_CLASSES is {cfg.MODEL.SOLO.NUM_CLASSES} but dataset "
                    f"{name!r} (DATASETS.{key}) has {len(classes)} categories ({shown}); set "
                    f"MODEL.SOLO.NUM_CLASSES {len(classes)}"
                )
    weights = cfg.MODEL.WEIGHTS
    if check_weights and weights and "://" not in weights and not os.path.isfile(weights):
        if not (resume and _resumable(cfg)):
            raise ConfigError(f"MODEL.WEIGHTS file not found: {weights}")


def _staging_dir(output_dir: str) -> str:
    return os.path.join(output_dir, f".staging{TMP_MARKER}{os.getpid()}")


class SOLOCOCOEvaluator(COCOEvaluator):
    """COCOEvaluator for SOLO: checked ground truth, atomic result files, 0 AP on no prediction.

    * For a dataset registered by :func:`solo_d2.data.datasets.register_coco_dataset`, the ground
      truth is the checked annotation file: the faulty annotations and images it reports (see
      :mod:`solo_d2.data.validation`) are left out, counted and named in the log and listed in
      ``<output_dir>/data_faults.json``; missing "area" / "iscrowd" fields are filled in.
    * ``instances_predictions.pth``, ``coco_instances_results.json`` and the metrics
      (``evaluation_results.json``, NaN written as null) are written to a staging folder, then
      each is renamed into ``output_dir``: a killed evaluation leaves the previous files intact.
    * When the model predicts nothing on any image, AP is reported as 0, not NaN.
    """

    def __init__(self, dataset_name: str, *args, **kwargs):
        super().__init__(dataset_name, *args, **kwargs)
        self._dataset_name = dataset_name
        self._faults = []
        if self._metadata.get("data_faults", None) is not None:
            self._use_checked_ground_truth()

    def _use_checked_ground_truth(self) -> None:
        json_file = self._metadata.json_file
        data = read_coco_json(json_file)
        checked = check_coco_dict(data, json_file, self._metadata.get("image_root", None))
        self._faults = checked.faults
        if checked.faults:
            self._logger.warning(
                f"Evaluation data {self._dataset_name!r} ({json_file}) has "
                f"{len(checked.faults)} faults; evaluating without the "
                f"{len(checked.bad_annotations)} faulty annotations and "
                f"{len(checked.bad_images)} faulty images:\n" + summarize_faults(checked.faults)
            )
        coco = COCO()
        coco.dataset = clean_coco_dict(data, checked)
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            coco.createIndex()
        self._coco_api = coco

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names)
        return results if coco_eval is not None else {k: 0.0 for k in results}

    def evaluate(self, img_ids=None):
        output_dir = self._output_dir
        if not output_dir or not comm.is_main_process():
            return super().evaluate(img_ids)
        os.makedirs(output_dir, exist_ok=True)
        remove_stale_temporaries(output_dir)
        staging = _staging_dir(output_dir)
        os.makedirs(staging, exist_ok=True)
        self._output_dir = staging
        try:
            results = super().evaluate(img_ids)
            for name in sorted(os.listdir(staging)):
                os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
            if self._faults:
                atomic_write_json(
                    os.path.join(output_dir, "data_faults.json"),
                    [f.to_dict() for f in self._faults],
                    indent=1,
                    default=str,
                )
            if results:
                atomic_write_json(
                    os.path.join(output_dir, "evaluation_results.json"),
                    _finite_or_null(results),
                    indent=2,
                )
        finally:
            self._output_dir = output_dir
            shutil.rmtree(staging, ignore_errors=True)
        return results


def _finite_or_null(obj):
    """``obj`` with NaN / infinite floats replaced by None (JSON has no NaN; COCO reports NaN for
    an area range without objects)."""
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _trim_metrics(path: str, start_iter: int) -> int:
    """Cut ``metrics.json`` after its last complete record of an iteration before ``start_iter``.

    A run killed mid-write leaves a partial last line, and the records of iterations after its
    last checkpoint describe training that resuming repeats. The file is truncated in place
    (detectron2's JSONWriter keeps it open for appending). Returns the number of bytes removed.
    """
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        content = f.read()
    keep = 0
    for line in content.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not isinstance(record, dict) or record.get("iteration", -1) >= start_iter:
            break
        keep += len(line)
    if keep < len(content):
        os.truncate(path, keep)
    return len(content) - keep


def _report_training_faults(cfg: CfgNode, names: Iterable[str]) -> None:
    """Log the faults of the training datasets, list them in OUTPUT_DIR; raise when strict."""
    for name in names:
        faults = MetadataCatalog.get(name).get("data_faults", None)
        if not faults:
            continue
        if cfg.DATASETS.STRICT:
            raise DatasetError(
                f"Training dataset {name!r} has {len(faults)} faulty annotations or images and "
                f"DATASETS.STRICT is on (set it False to skip them with a warning):\n"
                + summarize_faults(faults)
            )
        listing = os.path.join(cfg.OUTPUT_DIR, f"data_faults_{name}.json")
        if comm.is_main_process():
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
            atomic_write_json(listing, [f.to_dict() for f in faults], indent=1, default=str)
        logger.warning(
            f"Training dataset {name!r}: {len(faults)} faulty annotations or images are left "
            f"out (listed in {listing}; DATASETS.STRICT True makes them errors)"
        )


class Trainer(DefaultTrainer):
    """DefaultTrainer with SOLO targets in the data loader and COCO segm + bbox evaluation.

    Checkpoints are written atomically; see the module docstring for the other safeguards.
    """

    def __init__(self, cfg: CfgNode):
        check_config(cfg, check_weights=False)  # before the model is built
        super().__init__(cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's SGD, or AdamW when ``SOLVER.OPTIMIZER`` is "ADAMW" (used to train from
        scratch quickly, e.g. the quickstart); gradient clipping applies to both."""
        if cfg.SOLVER.OPTIMIZER.upper() == "SGD":
            return super().build_optimizer(cfg, model)
        if cfg.SOLVER.OPTIMIZER.upper() != "ADAMW":
            raise ValueError(
                f"SOLVER.OPTIMIZER must be 'SGD' or 'ADAMW', got {cfg.SOLVER.OPTIMIZER!r}"
            )
        params = get_default_optimizer_params(model, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM)
        adamw = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
        return adamw(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)

    @classmethod
    def build_train_loader(cls, cfg):
        _report_training_faults(cfg, cfg.DATASETS.TRAIN)
        return build_detection_train_loader(cfg, mapper=SOLODatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg,
            dataset_name,
            mapper=SOLODatasetMapper(cfg, False),
            batch_size=cfg.TEST.IMS_PER_BATCH,
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return SOLOCOCOEvaluator(dataset_name, tasks=("segm", "bbox"), output_dir=output_folder)

    def build_hooks(self):
        # DefaultTrainer.__init__ made a plain DetectionCheckpointer; its hooks get this one.
        old = self.checkpointer
        self.checkpointer = AtomicCheckpointer(
            old.model, old.save_dir, save_to_disk=old.save_to_disk, **old.checkpointables
        )
        return super().build_hooks()

    def resume_or_load(self, resume: bool = True):
        """detectron2's resume_or_load; on resume also removes partial files a killed run left
        and trims ``metrics.json`` back to the iterations before the resumed one."""
        if resume and comm.is_main_process() and os.path.isdir(self.cfg.OUTPUT_DIR):
            remove_stale_temporaries(self.cfg.OUTPUT_DIR)
        super().resume_or_load(resume=resume)
        if resume and self.start_iter > 0 and comm.is_main_process():
            removed = _trim_metrics(
                os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), self.start_iter
            )
            if removed:
                logger.info(
                    f"Trimmed {removed} bytes of metrics.json records from iteration "
                    f"{self.start_iter} on (written after the last checkpoint, or partial)"
                )

    def train(self):
        try:
            return super().train()
        except FloatingPointError as e:
            last = (
                self.checkpointer.get_checkpoint_file()
                if self.checkpointer.has_checkpoint()
                else ""
            )
            note = (
                f"The last checkpoint on disk is {last} (written before the non-finite loss); "
                "after fixing the cause, continue from it with --resume."
                if last
                else "No checkpoint was written before the non-finite loss."
            )
            logger.error(note)
            if hasattr(e, "add_note"):  # Python >= 3.11: shown under the traceback
                e.add_note(note)
            raise
