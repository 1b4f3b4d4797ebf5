"""Training with detectron2's ``DefaultTrainer``: the SOLO mapper, atomic checkpoints, checked data.

Safeguards of :class:`Trainer`:
* the config is checked (:func:`solo_d2.engine.preflight.check_config`) before the model is built;
* checkpoints are written atomically (:class:`solo_d2.checkpoint.AtomicCheckpointer`);
* faulty training data is reported, or refused with ``DATASETS.STRICT``;
* on resume, ``metrics.json`` is trimmed back to the resumed iteration;
* a NaN or infinite loss names the last checkpoint on disk;
* SIGTERM or SIGUSR1 (a preemption) stops training after the current iteration, with a checkpoint
  of it and exit status 75 (:class:`~solo_d2.engine.hooks.PreemptionHook`).

With ``TEST.SAVE_PLOTS`` (the default), evaluations write ``per_class_ap_<dataset>.png`` and
training writes ``loss_curve.png`` into ``OUTPUT_DIR``
(:mod:`solo_d2.visualization.training_plots`); a failed plot logs a warning.
"""

import json
import logging
import os
from typing import Optional

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader
from detectron2.engine import DefaultTrainer
from detectron2.engine import create_ddp_model as d2_create_ddp_model
from detectron2.engine.hooks import EvalHook
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from torch import nn

from ..atomic_io import remove_stale_temporaries
from ..checkpoint import AtomicCheckpointer
from ..compat import default_trainer_ddp
from ..data.training_data import build_train_loader
from ..kinds import get_kind, kind_of
from .hooks import LossCurveHook, PreemptionHook, leave_signals_to_trainer
from .preflight import check_config

__all__ = ["Trainer", "create_ddp_model"]

logger = logging.getLogger(__name__)


def create_ddp_model(model: nn.Module, **kwargs) -> nn.Module:
    """detectron2's ``create_ddp_model``, which also works for a model on the CPU.

    detectron2 always passes ``device_ids=[local_rank]``, which DistributedDataParallel rejects
    for CPU modules; without device ids, multi-process (GLOO) training on CPU works.
    """
    params = next(model.parameters(), None)
    if params is not None and params.device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return d2_create_ddp_model(model, **kwargs)


def build_mapper(cfg: CfgNode, is_train: bool, dataset_name: Optional[str] = None):
    """The data mapper for the model of ``cfg`` that the kind of ``dataset_name`` (by default the
    first of ``DATASETS.TRAIN``, else of ``DATASETS.TEST``) gives (:mod:`solo_d2.kinds`):
    SOLODatasetMapper, SOLOPanopticDatasetMapper for a panoptic model on panoptic data."""
    names = [dataset_name] if dataset_name else [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]
    kind = kind_of(names[0]) if names else get_kind("coco")
    return kind.build_mapper(cfg, is_train)


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


def save_ap_charts(output_dir: str, results_per_dataset: dict) -> None:
    """Write ``per_class_ap_<dataset>.png`` into ``output_dir`` for each dataset whose results
    have per-class AP (COCO instance evaluation); a failure logs a warning."""
    from ..visualization.training_plots import per_class_ap_file, plot_per_class_ap

    for name, results in results_per_dataset.items():
        out = os.path.join(output_dir, per_class_ap_file(name))
        try:
            os.makedirs(output_dir, exist_ok=True)
            if plot_per_class_ap(results, out, title=f"Per-class AP on {name}"):
                logger.info(f"Per-class AP chart written to {out}")
        except Exception as e:  # a plot must never lose the evaluation results
            logger.warning(f"Could not plot the per-class AP of {name}: {type(e).__name__}: {e}")


class Trainer(DefaultTrainer):
    """DefaultTrainer with SOLO targets in the data loader and COCO segm + bbox evaluation
    (see the module docstring for its safeguards)."""

    def __init__(self, cfg: CfgNode):
        """``DefaultTrainer.__init__``, after checking the config; the model is wrapped by
        :func:`create_ddp_model` (CPU processes work) and checkpoints are atomic (the
        checkpointer is replaced in :meth:`build_hooks`)."""
        check_config(cfg, check_weights=False)  # before the model is built
        with default_trainer_ddp(create_ddp_model):
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
        """The data layer's loader (:func:`solo_d2.data.training_data.build_train_loader`: packs or
        detectron2's path) with SOLO targets; its workers leave SIGTERM and SIGUSR1 to the
        training process (:func:`~solo_d2.engine.hooks.leave_signals_to_trainer`)."""
        packs = all(kind_of(name).packs for name in cfg.DATASETS.TRAIN)  # the kinds that pack
        loader = build_train_loader(cfg, mapper=build_mapper(cfg, True), use_packs=packs)
        return leave_signals_to_trainer(loader)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        loader = build_detection_test_loader(
            cfg,
            dataset_name,
            mapper=build_mapper(cfg, False, dataset_name),
            batch_size=cfg.TEST.IMS_PER_BATCH,
        )
        return leave_signals_to_trainer(loader)  # evaluations during training

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's evaluation, after checking the test datasets against the config (their
        class count, their files): also when called from Python, not only via train_net.py."""
        check_config(cfg, check_weights=False, splits=("TEST",))
        results = super().test(cfg, model, evaluators)
        names = list(cfg.DATASETS.TEST)
        if cfg.TEST.SAVE_PLOTS and names and comm.is_main_process():
            # DefaultTrainer.test unwraps the results of a single dataset
            save_ap_charts(cfg.OUTPUT_DIR, {names[0]: results} if len(names) == 1 else results)
        return results

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """The evaluator of the dataset's kind (:mod:`solo_d2.kinds`): COCO mask and box AP; PQ
        and the things' mask and box AP for panoptic data (those in the ``things`` subfolder);
        LVIS's federated AP."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return kind_of(dataset_name).build_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self):
        """detectron2's hooks, and a :class:`~solo_d2.engine.hooks.PreemptionHook` after the
        checkpointer and before the evaluation (a preempted run stops without evaluating).

        First ``self.checkpointer`` (``DefaultTrainer.__init__``'s DetectionCheckpointer) becomes
        an :class:`~solo_d2.checkpoint.AtomicCheckpointer` of the same model, folder and
        checkpointables, which the hooks, ``resume_or_load`` and the preemption then use."""
        plain = self.checkpointer
        if not isinstance(plain, AtomicCheckpointer):
            self.checkpointer = AtomicCheckpointer(
                plain.model,
                plain.save_dir,
                save_to_disk=plain.save_to_disk,
                **plain.checkpointables,
            )
        ret = super().build_hooks()
        evaluation = next(i for i, h in enumerate(ret) if isinstance(h, EvalHook))
        ret.insert(evaluation, PreemptionHook())
        if self.cfg.TEST.SAVE_PLOTS:  # last: after the PeriodicWriter has written metrics.json
            ret.append(LossCurveHook(self.cfg.OUTPUT_DIR, self.cfg.TEST.EVAL_PERIOD))
        return ret

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
