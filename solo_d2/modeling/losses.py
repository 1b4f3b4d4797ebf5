"""SOLO losses: sigmoid focal loss on grid categories, dice loss on masks.

Shape shorthand:
    B: images    C: classes    S_l: grid size of level l    P: positive samples    K: mask pixels
"""

from typing import List

import torch
from fvcore.nn import sigmoid_focal_loss
from torch import Tensor

__all__ = ["dice_loss", "category_loss"]


def dice_loss(probs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample dice loss, ``1 - 2*sum(p*t) / (sum(p^2) + sum(t^2) + 0.002)``.

    Args:
        probs: (P, K) mask probabilities (after sigmoid).
        targets: (P, K) {0,1} targets, any dtype.
    Returns:
        (P,) losses.
    """
    t = targets.to(probs.dtype)
    inter = (probs * t).sum(dim=1)
    denom = (probs * probs).sum(dim=1) + 0.001 + (t * t).sum(dim=1) + 0.001
    return 1 - 2 * inter / denom


def category_loss(
    cate_logits: List[Tensor], cate_labels: List[Tensor], *, alpha: float, gamma: float
) -> Tensor:
    """Sigmoid focal loss over every cell and class, summed and divided by (positive cells + 1).

    Args:
        cate_logits: per level, (B, C, S_l, S_l).
        cate_labels: per level, (B, S_l, S_l) int64 in [0, C] (C = background).
        alpha, gamma: focal loss parameters.
    Returns:
        scalar loss (before the loss weight).
    """
    num_classes = cate_logits[0].shape[1]
    logits = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, num_classes) for x in cate_logits])
    labels = torch.cat([x.reshape(-1) for x in cate_labels])
    # one-hot with an extra background column that is dropped
    onehot = torch.zeros(len(labels), num_classes + 1, dtype=logits.dtype, device=logits.device)
    onehot.scatter_(1, labels[:, None], 1)
    num_pos = (labels != num_classes).sum()
    loss = sigmoid_focal_loss(logits, onehot[:, :-1], alpha=alpha, gamma=gamma, reduction="sum")
    return loss / (num_pos + 1)
