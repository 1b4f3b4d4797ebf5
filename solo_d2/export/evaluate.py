"""Evaluate an export on a registered dataset beside the PyTorch model it came from.

Both go through the training's evaluation (:meth:`solo_d2.engine.Trainer.test`: its test loader,
resize and evaluator, e.g. COCO mask and box AP); an export runs as
:class:`.runtime.ONNXRuntimeModel`, which takes and returns what the PyTorch model does. The
difference of their mask AP is what the export costs in accuracy (int8 quantization above all).
"""

import copy
import logging
from pathlib import Path
from typing import Dict, Union

from detectron2.config import CfgNode
from torch import nn

__all__ = ["DEFAULT_MAX_AP_DROP", "check_evaluation_dataset", "evaluate_model", "mask_ap_drop"]

logger = logging.getLogger(__name__)

# Largest mask AP (points, 0-100) an export may lose against the PyTorch model by default.
DEFAULT_MAX_AP_DROP = 0.5


def _test_config(cfg: CfgNode, dataset_name: str, output_dir: Union[str, Path]) -> CfgNode:
    cfg = copy.deepcopy(cfg)
    cfg.defrost()
    cfg.DATASETS.TEST = (dataset_name,)
    cfg.TEST.SAVE_PLOTS = False
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.freeze()
    return cfg


def check_evaluation_dataset(cfg: CfgNode, dataset_name: str) -> None:
    """Check before any work that ``dataset_name`` is registered, on disk and fits the model
    (:func:`solo_d2.engine.check_config` on it as the test set).

    Raises:
        ConfigError: one line naming the dataset and the fix.
    """
    from ..engine import check_config

    check_config(_test_config(cfg, dataset_name, "."), check_weights=False, splits=("TEST",))


def evaluate_model(
    cfg: CfgNode, model, dataset_name: str, output_dir: Union[str, Path]
) -> Dict[str, Dict[str, float]]:
    """Evaluate ``model`` (a PyTorch SOLO model or an :class:`.runtime.ONNXRuntimeModel`) on the
    registered ``dataset_name`` as training evaluates: the test loader and the evaluator of
    :class:`solo_d2.engine.Trainer` for the dataset's ``evaluator_type``.

    Args:
        cfg: the model's config (its test resize and loader settings are used).
        output_dir: the evaluation's ``OUTPUT_DIR`` (the evaluator writes its predictions file
            to ``inference/<dataset_name>`` in it).
    Returns:
        detectron2's results, e.g. ``{"segm": {"AP": ...}, "bbox": {...}}``.
    """
    from ..engine import Trainer

    cfg = _test_config(cfg, dataset_name, output_dir)
    if isinstance(model, nn.Module):
        model.eval()
    # the evaluator is built after the loader, which generates the synthetic datasets' files
    results = Trainer.test(cfg, model)
    return {task: dict(metrics) for task, metrics in results.items()}


def mask_ap_drop(
    pytorch: Dict[str, Dict[str, float]], export: Dict[str, Dict[str, float]]
) -> float:
    """Mask AP of the PyTorch model minus the export's (points; positive: the export is worse)."""
    return float(pytorch["segm"]["AP"]) - float(export["segm"]["AP"])
