"""Training and evaluation with detectron2's ``DefaultTrainer``: the SOLO mapper and COCO evaluation."""
import os

import detectron2.engine.defaults as _d2_defaults
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator

from .data.dataset_mapper import SOLODatasetMapper

__all__ = ["Trainer"]

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


class Trainer(DefaultTrainer):
    """DefaultTrainer with SOLO targets in the data loader and COCO segm + bbox evaluation."""

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=SOLODatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=SOLODatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, tasks=("segm", "bbox"), output_dir=output_folder)
