"""Training and evaluation with detectron2's ``DefaultTrainer``: SOLO mapper, COCO evaluation."""

import os

import detectron2.engine.defaults as _d2_defaults
import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from .data.dataset_mapper import SOLODatasetMapper

__all__ = ["SOLOCOCOEvaluator", "Trainer"]

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


class SOLOCOCOEvaluator(COCOEvaluator):
    """COCOEvaluator that reports 0 AP, not NaN, when the model predicts nothing on any image."""

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names)
        return results if coco_eval is not None else {k: 0.0 for k in results}


class Trainer(DefaultTrainer):
    """DefaultTrainer with SOLO targets in the data loader and COCO segm + bbox evaluation."""

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
        return build_detection_train_loader(cfg, mapper=SOLODatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=SOLODatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return SOLOCOCOEvaluator(dataset_name, tasks=("segm", "bbox"), output_dir=output_folder)
