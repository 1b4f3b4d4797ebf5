"""Evaluators of SOLO-family models."""

from .coco_evaluation import SOLOCOCOEvaluator

__all__ = ["SOLOCOCOEvaluator"]
