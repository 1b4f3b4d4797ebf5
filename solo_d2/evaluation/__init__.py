"""Evaluators of SOLO-family models, one per kind of dataset (``evaluator_type``)."""

from .coco_evaluation import SOLOCOCOEvaluator
from .lvis_evaluation import SOLOLVISEvaluator
from .panoptic_evaluation import SOLOPanopticEvaluator

__all__ = ["SOLOCOCOEvaluator", "SOLOLVISEvaluator", "SOLOPanopticEvaluator"]
