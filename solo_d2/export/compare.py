"""Compare an exported model's detections with the PyTorch model's (the export parity check).

Float32 results differ in their last bits between runtimes (PyTorch's oneDNN kernels, ONNX
Runtime's) and between CPU types, so detections whose scores are nearly tied may come out in a
different order. They are therefore paired, not compared index by index: detections of the same
class, scores within the tolerance, most overlapping masks first (:func:`pair_detections`). The
pairing does not depend on the order of the detections; a detection of another class, a mask
that moved, a missing or extra detection, or a score off by more than the tolerance all break
the agreement.
"""

from dataclasses import dataclass, field
from typing import Tuple, Union

import numpy as np
import torch
from detectron2.structures import Instances

__all__ = ["SCORE_TOL", "MIN_IOU", "Agreement", "compare_detections", "pair_detections"]

# The tolerances of the parity check: the same as against AdelaiDet (``python -m dev.parity``).
SCORE_TOL, MIN_IOU = 1e-3, 0.99
# Masks with at least this IoU are taken for the same object when detections are paired.
_SAME_OBJECT_IOU = 0.5
# Most float values of masks converted at once to compute intersections (128 MB in float32).
_BLOCK_VALUES = 2**25

ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass
class Agreement:
    """How exported detections agree with the reference, pair by pair.

    ``pairs`` holds ``(reference index, exported index, mask IoU)`` (:func:`pair_detections`);
    ``max_score_diff`` and ``min_mask_iou`` are over the pairs (0 and 1 when there is none);
    ``same_classes`` compares the two lists of classes as multisets (the same number of
    detections of every class).
    """

    num: int
    num_reference: int
    max_score_diff: float
    same_classes: bool
    min_mask_iou: float
    pairs: Tuple[Tuple[int, int, float], ...] = field(default=(), repr=False)
    score_tol: float = SCORE_TOL
    min_iou: float = MIN_IOU

    @property
    def num_paired(self) -> int:
        """Number of pairs."""
        return len(self.pairs)

    @property
    def ok(self) -> bool:
        """Every detection paired with one of the same class, scores within ``score_tol``, every
        mask IoU >= ``min_iou``."""
        return (
            self.num == self.num_reference == self.num_paired
            and self.max_score_diff <= self.score_tol
            and self.same_classes
            and self.min_mask_iou >= self.min_iou
        )

    def __str__(self) -> str:
        return (
            f"{self.num} detections (PyTorch {self.num_reference}), {self.num_paired} paired, "
            f"max |dscore| {self.max_score_diff:.2e}, classes "
            f"{'identical' if self.same_classes else 'DIFFER'}, min mask IoU "
            f"{self.min_mask_iou:.4f}"
        )


def _numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoUs of bool masks; two empty masks have IoU 1.

    Intersections are products of 0/1 float masks, a block of masks at a time so that at most
    ``_BLOCK_VALUES`` float values per operand exist at once (an 8000 x 6000 image: one mask).
    """
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    pixels = a.shape[1]
    # 0/1 products summed in float32 are exact integers below 2**24 pixels
    dtype = np.float32 if pixels < 2**24 else np.float64
    rows = max(1, _BLOCK_VALUES // max(pixels, 1))
    inter = np.empty((len(a), len(b)))
    for i in range(0, len(a), rows):
        a_block = a[i : i + rows].astype(dtype)
        for j in range(0, len(b), rows):
            inter[i : i + rows, j : j + rows] = a_block @ b[j : j + rows].astype(dtype).T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def pair_detections(
    ref_scores: np.ndarray,
    ref_classes: np.ndarray,
    ref_masks: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    masks: np.ndarray,
    score_tol: float = SCORE_TOL,
) -> Tuple[Tuple[int, int, float], ...]:
    """Pair reference and other detections: ``(reference index, other index, mask IoU)``.

    Only detections of the same class are paired, greedily, most overlapping masks first (the
    order of the detections plays no part): first pairs whose scores differ by at most
    ``score_tol`` and whose masks have IoU >= 0.5 (the same object); then, among those left,
    pairs with IoU >= 0.5 whatever their scores, and pairs with scores within ``score_tol``
    whatever their masks, so that a score or a mask that moved is reported as such rather than
    as a missing and an extra detection. Detections left without a partner are left out.

    Args:
        ref_scores, scores: (N_ref,) and (N,) scores.
        ref_classes, classes: (N_ref,) and (N,) integer classes.
        ref_masks, masks: (N_ref, H, W) and (N, H, W) bool masks.
    """
    candidates = []  # (tier, -IoU, reference index, other index, IoU)
    for c in np.intersect1d(ref_classes, classes):
        ri, oi = np.nonzero(ref_classes == c)[0], np.nonzero(classes == c)[0]
        iou = _mask_ious(ref_masks[ri], masks[oi])
        close = np.abs(ref_scores[ri][:, None] - scores[oi][None, :]) <= score_tol
        same_object = iou >= _SAME_OBJECT_IOU
        tier = np.where(close & same_object, 0, np.where(same_object, 1, 2))
        for k, j in zip(*np.nonzero(close | same_object)):
            candidates.append((tier[k, j], -iou[k, j], ri[k], oi[j], iou[k, j]))
    pairs, ref_free, free = [], set(range(len(ref_scores))), set(range(len(scores)))
    for _, _, r, o, iou in sorted(candidates):
        if r in ref_free and o in free:
            ref_free.remove(r)
            free.remove(o)
            pairs.append((int(r), int(o), float(iou)))
    return tuple(sorted(pairs))


def compare_detections(
    reference: Instances,
    scores: ArrayLike,
    classes: ArrayLike,
    masks: ArrayLike,
    *,
    score_tol: float = SCORE_TOL,
    min_iou: float = MIN_IOU,
) -> Agreement:
    """Pair exported detections with the reference's (:func:`pair_detections`) and summarise.

    Args:
        reference: the PyTorch model's Instances (scores, pred_classes, pred_masks).
        scores: (N,) exported scores; classes: (N,); masks: (N, H, W) bool or 0/1.
        score_tol: largest score difference of a pair (also the pairing's score window).
        min_iou: smallest mask IoU of a pair for :attr:`Agreement.ok`.
    """
    ref_scores = _numpy(reference.scores).astype(np.float64)
    ref_classes = _numpy(reference.pred_classes).astype(np.int64)
    ref_masks = _numpy(reference.pred_masks).astype(bool)
    scores, classes = _numpy(scores).astype(np.float64), _numpy(classes).astype(np.int64)
    masks = _numpy(masks).astype(bool)
    if masks.shape[1:] != ref_masks.shape[1:]:
        raise ValueError(f"mask sizes differ: {masks.shape[1:]} vs {ref_masks.shape[1:]}")
    pairs = pair_detections(
        ref_scores, ref_classes, ref_masks, scores, classes, masks, score_tol=score_tol
    )
    ri = np.array([p[0] for p in pairs], dtype=np.int64)
    oi = np.array([p[1] for p in pairs], dtype=np.int64)
    return Agreement(
        num=len(scores),
        num_reference=len(ref_scores),
        max_score_diff=float(np.abs(scores[oi] - ref_scores[ri]).max()) if pairs else 0.0,
        same_classes=bool(np.array_equal(np.sort(classes), np.sort(ref_classes))),
        min_mask_iou=min((p[2] for p in pairs), default=1.0),
        pairs=pairs,
        score_tol=score_tol,
        min_iou=min_iou,
    )
