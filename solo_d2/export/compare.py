"""Compare an exported model's detections with the PyTorch model's (the export parity check)."""

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from detectron2.structures import Instances

__all__ = ["SCORE_TOL", "MIN_IOU", "Agreement", "compare_detections"]

# The tolerances of the parity check: the same as against AdelaiDet (tools/check_parity.py).
SCORE_TOL, MIN_IOU = 1e-3, 0.99

ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass
class Agreement:
    """How exported detections agree with the reference, detection by detection in order."""

    num: int
    num_reference: int
    max_score_diff: float
    same_classes: bool
    min_mask_iou: float

    @property
    def ok(self) -> bool:
        """Same count, scores within SCORE_TOL, identical classes, every mask IoU >= MIN_IOU."""
        return (
            self.num == self.num_reference
            and self.max_score_diff <= SCORE_TOL
            and self.same_classes
            and self.min_mask_iou >= MIN_IOU
        )

    def __str__(self) -> str:
        return (
            f"{self.num} detections (PyTorch {self.num_reference}), max |dscore| "
            f"{self.max_score_diff:.2e}, classes {'identical' if self.same_classes else 'DIFFER'}"
            f", min mask IoU {self.min_mask_iou:.4f}"
        )


def _numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def compare_detections(
    reference: Instances, scores: ArrayLike, classes: ArrayLike, masks: ArrayLike
) -> Agreement:
    """Compare the first min(N, N_ref) detections, in order.

    Args:
        reference: the PyTorch model's Instances (scores, pred_classes, pred_masks).
        scores: (N,) exported scores; classes: (N,); masks: (N, H, W) bool or 0/1.
    """
    ref_scores = _numpy(reference.scores)
    ref_classes = _numpy(reference.pred_classes)
    ref_masks = _numpy(reference.pred_masks).astype(bool)
    scores, classes, masks = _numpy(scores), _numpy(classes), _numpy(masks).astype(bool)
    if masks.shape[1:] != ref_masks.shape[1:]:
        raise ValueError(f"mask sizes differ: {masks.shape[1:]} vs {ref_masks.shape[1:]}")
    n = min(len(scores), len(ref_scores))
    score_diff = float(np.abs(scores[:n] - ref_scores[:n]).max()) if n else 0.0
    inter = np.logical_and(masks[:n], ref_masks[:n]).sum(axis=(1, 2))
    union = np.logical_or(masks[:n], ref_masks[:n]).sum(axis=(1, 2))
    ious = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return Agreement(
        num=len(scores),
        num_reference=len(ref_scores),
        max_score_diff=score_diff,
        same_classes=bool(np.array_equal(classes[:n].astype(np.int64), ref_classes[:n])),
        min_mask_iou=float(ious.min()) if n else 1.0,
    )
