"""SOLO target assignment (SOLO, Wang et al., ECCV 2020, §3.1), as pure vectorised functions.

Shape shorthand:
    N: instances of one image       M: instances of the whole batch (images concatenated)
    B: images                       S: grid size of a level         P: positive samples
    H, W: image size                Hc, Wc: padded batch canvas (= mask-feature size * stride)

The work is split where padding makes it necessary:
* ``instance_targets`` runs in the DatasetMapper workers on one image: centre of mass and the mask
  rescaled to the mask-prediction stride. Neither depends on batch padding. SOLO v1 and Decoupled
  SOLO predict masks at several strides (4, 8, 16: half of each level's stride);
  ``extra_mask_targets`` gives the masks at the coarser ones.
* ``assign_grid_targets`` runs in the model, once the padded batch canvas is known: SOLO measures
  grid cells as fractions of that canvas (reference behaviour, kept for checkpoint compatibility).
* ``panoptic_targets`` (panoptic models, in the workers): the thing masks and the semantic target
  of an augmented panoptic id map (solo_d2/data/panoptic.py describes the conventions).
"""

from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch import Tensor

__all__ = [
    "center_of_mass",
    "rescale_masks",
    "instance_targets",
    "mask_target_field",
    "extra_mask_targets",
    "assign_grid_targets",
    "panoptic_targets",
]

# OpenCV 5 resizes at most 128 channels in one call.
_CV2_MAX_CHANNELS = 128


def center_of_mass(masks: Tensor) -> Tensor:
    """Centre of mass of binary masks, in pixel indices (no +0.5), float32 as the reference.

    Args:
        masks: (N, H, W) bool or {0,1} masks.
    Returns:
        (N, 2) float32 [cx, cy]. An empty mask gives (0, 0).
    """
    m = masks.to(torch.float32)
    h, w = m.shape[-2:]
    xs = torch.arange(w, dtype=torch.float32, device=m.device)
    ys = torch.arange(h, dtype=torch.float32, device=m.device)
    m00 = m.sum(dim=-1).sum(dim=-1).clamp(min=1e-6)
    cx = (m * xs).sum(dim=-1).sum(dim=-1) / m00
    cy = (m * ys[:, None]).sum(dim=-1).sum(dim=-1) / m00
    return torch.stack([cx, cy], dim=1)


def rescale_masks(masks: np.ndarray, stride: int) -> np.ndarray:
    """Downscale masks by ``1/stride`` exactly as ``mmcv.imrescale`` (cv2 INTER_LINEAR).

    Args:
        masks: (N, H, W) uint8/bool.
        stride: mask-prediction stride (4 for SOLOv2).
    Returns:
        (N, int(H/stride + 0.5), int(W/stride + 0.5)) uint8 in {0, 1}.
    """
    n, h, w = masks.shape
    size = (int(w / stride + 0.5), int(h / stride + 0.5))  # cv2 wants (width, height)
    out = np.empty((n, size[1], size[0]), dtype=np.uint8)
    hwn = np.ascontiguousarray(masks.astype(np.uint8).transpose(1, 2, 0))
    for start in range(0, n, _CV2_MAX_CHANNELS):  # loop over channel chunks, not instances
        chunk = cv2.resize(
            hwn[:, :, start : start + _CV2_MAX_CHANNELS], size, interpolation=cv2.INTER_LINEAR
        )
        out[start : start + _CV2_MAX_CHANNELS] = chunk.reshape(size[1], size[0], -1).transpose(
            2, 0, 1
        )
    return out


def instance_targets(masks: Tensor, stride: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-instance target quantities that do not depend on batch padding.

    Args:
        masks: (N, H, W) bool masks at the model-input resolution.
        stride: mask-prediction stride.
    Returns:
        valid: (N,) bool, mask not empty (empty instances are never positive).
        centers: (N, 2) float32 [cx, cy] centre of mass in input pixels.
        masks_small: (N, h', w') uint8 masks rescaled by 1/stride (pasted top-left at loss time).
    """
    valid = masks.flatten(1).any(dim=1) if len(masks) else masks.new_zeros(0, dtype=torch.bool)
    centers = center_of_mass(masks)
    small = torch.from_numpy(rescale_masks(masks.cpu().numpy(), stride)).to(masks.device)
    return valid, centers, small


def mask_target_field(stride: int, mask_stride: int) -> str:
    """Name of the Instances field holding the masks rescaled to ``stride``.

    The masks at the model's mask stride (its finest) keep the name ``gt_masks_small``; masks at
    a coarser stride s (SOLO v1 / Decoupled SOLO levels) are ``gt_masks_small_s{s}``.
    """
    return "gt_masks_small" if stride == mask_stride else f"gt_masks_small_s{stride}"


def extra_mask_targets(masks: Tensor, mask_stride: int, strides) -> Dict[str, Tensor]:
    """Masks rescaled to each stride of ``strides`` other than ``mask_stride``.

    Args:
        masks: (N, H, W) bool masks at the model-input resolution.
        mask_stride: the stride of ``gt_masks_small`` (not repeated here).
        strides: the strides the model needs.
    Returns:
        {field name (see :func:`mask_target_field`): (N, int(H/s+0.5), int(W/s+0.5)) uint8}.
    """
    numpy_masks = None
    out = {}
    for s in sorted(set(strides) - {mask_stride}):
        if numpy_masks is None:
            numpy_masks = masks.cpu().numpy()
        small = torch.from_numpy(rescale_masks(numpy_masks, s)).to(masks.device)
        out[mask_target_field(s, mask_stride)] = small
    return out


def _floor_cell(x: Tensor, num_grid: int) -> Tensor:
    # Reference: int(x // (1. / S)) on float32 tensors; torch's floor division matches Python's.
    return torch.div(x, 1.0 / num_grid, rounding_mode="floor").to(torch.int64)


@torch.no_grad()
def assign_grid_targets(
    boxes: Tensor,
    centers: Tensor,
    labels: Tensor,
    image_ids: Tensor,
    num_images: int,
    canvas_hw: Tuple[int, int],
    num_grids: Sequence[int],
    scale_ranges: Sequence[Sequence[float]],
    sigma: float,
    num_classes: int,
    last_instance_wins: bool = False,
) -> Tuple[List[Tensor], List[Tensor]]:
    """Assign instances to grid cells of every level, for every variant.

    An instance is positive on level l when sqrt(box area) lies in ``scale_ranges[l]`` (inclusive).
    Its positive cells are the cells hit by the sigma-scaled box around its centre of mass,
    clamped to the 3x3 cells around the centre cell. Where regions of two instances overlap, the
    cell's class is the later instance's. What happens to the masks there differs by variant:

    * SOLOv2 (``last_instance_wins=False``): both instances keep the cell as a positive sample, so
      a cell can appear twice among the positives, each time with its own mask target.
    * SOLO v1 / Decoupled SOLO (``last_instance_wins=True``): the reference writes each instance's
      mask into the cell's dense target in turn, so the cell is one positive sample whose mask is
      the later instance's.

    Args:
        boxes: (M, 4) XYXY boxes in input pixels.
        centers: (M, 2) [cx, cy] centres of mass.
        labels: (M,) int64 classes in [0, C).
        image_ids: (M,) int64 image of each instance, non-decreasing.
        num_images: B.
        canvas_hw: (Hc, Wc) padded batch canvas that grid cells divide.
        num_grids: S per level.
        scale_ranges: (lo, hi) per level.
        sigma: centre-region scale.
        num_classes: C; background cells get label C.
        last_instance_wins: one positive per covered cell, with the last covering instance.
    Returns:
        cate_labels: per level, (B, S, S) int64 in [0, C].
        positives: per level, (P_l, 3) int64 rows [image, cell = i*S + j, instance], in the
            reference order: instance, then row-major cell (SOLOv2); image, then row-major cell
            (``last_instance_wins``).
    """
    device = boxes.device
    hc, wc = float(canvas_hw[0]), float(canvas_hw[1])
    wh = (boxes[:, 2:] - boxes[:, :2]).to(torch.float32)  # (M, 2)
    areas = torch.sqrt(wh[:, 0] * wh[:, 1])
    half_w, half_h = 0.5 * wh[:, 0] * sigma, 0.5 * wh[:, 1] * sigma
    cx, cy = centers[:, 0].to(torch.float32), centers[:, 1].to(torch.float32)
    order = torch.arange(1, len(labels) + 1, device=device)  # 1-based instance rank

    cate_labels, positives = [], []
    for s, (lo, hi) in zip(num_grids, scale_ranges):  # loop over the 5 levels only
        hit = (areas >= lo) & (areas <= hi)
        coord_w, coord_h = _floor_cell(cx / wc, s), _floor_cell(cy / hc, s)
        top = torch.maximum(_floor_cell((cy - half_h) / hc, s).clamp(min=0), coord_h - 1)
        down = torch.minimum(_floor_cell((cy + half_h) / hc, s).clamp(max=s - 1), coord_h + 1)
        left = torch.maximum(_floor_cell((cx - half_w) / wc, s).clamp(min=0), coord_w - 1)
        right = torch.minimum(_floor_cell((cx + half_w) / wc, s).clamp(max=s - 1), coord_w + 1)

        idx = torch.arange(s, device=device)
        rows = (idx >= top[:, None]) & (idx <= down[:, None])  # (M, S)
        cols = (idx >= left[:, None]) & (idx <= right[:, None])  # (M, S)
        covered = (rows[:, :, None] & cols[:, None, :] & hit[:, None, None]).view(-1, s * s)

        # last instance wins the class of a shared cell: max rank per (image, cell)
        rank = covered.to(torch.int64) * order[:, None]  # (M, S*S)
        best = torch.zeros(num_images, s * s, dtype=torch.int64, device=device)
        best.scatter_reduce_(0, image_ids[:, None].expand_as(rank), rank, reduce="amax")
        lab = torch.cat([labels.new_full((1,), num_classes), labels])[best]  # rank 0 -> BG
        cate_labels.append(lab.view(num_images, s, s))

        if last_instance_wins:
            img, cell = best.nonzero(as_tuple=True)
            positives.append(torch.stack([img, cell, best[img, cell] - 1], dim=1))
        else:
            inst, cell = covered.nonzero(as_tuple=True)
            positives.append(torch.stack([image_ids[inst], cell, inst], dim=1))
    return cate_labels, positives


def panoptic_targets(
    ids: np.ndarray, segments_info: list[dict], ignore_label: int = 255
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instance and semantic targets of one (augmented) panoptic id map.

    Args:
        ids: (H, W) int64 segment ids (0 void).
        segments_info: the image's segments (contiguous "category_id", "isthing", "iscrowd").
    Returns:
        masks: (N, H, W) bool, one per non-crowd thing segment with pixels, by segment id.
        classes: (N,) int64 thing classes.
        sem_seg: (H, W) int64: stuff pixels their stuff id (1..K_st), thing pixels (crowd
            included) 0, void and unlisted ids ``ignore_label``.
    """
    h, w = ids.shape
    if not segments_info:
        empty = np.zeros((0, h, w), dtype=bool)
        return empty, np.zeros(0, dtype=np.int64), np.full((h, w), ignore_label, dtype=np.int64)
    seg_ids = np.array([s["id"] for s in segments_info], dtype=np.int64)
    isthing = np.array([bool(s["isthing"]) for s in segments_info], dtype=bool)
    crowd = np.array([bool(s.get("iscrowd", 0)) for s in segments_info], dtype=bool)
    cats = np.array([s["category_id"] for s in segments_info], dtype=np.int64)
    order = np.argsort(seg_ids)
    seg_ids, isthing, crowd, cats = seg_ids[order], isthing[order], crowd[order], cats[order]
    # every pixel's position in the sorted ids; ``found`` is False for void and unlisted ids
    pos = np.searchsorted(seg_ids, ids).clip(max=len(seg_ids) - 1)
    found = seg_ids[pos] == ids
    labels = np.where(isthing, 0, cats)
    sem_seg = np.where(found, labels[pos], ignore_label).astype(np.int64)
    keep = np.flatnonzero(isthing & ~crowd)
    masks = found[None] & (pos[None] == keep[:, None, None])
    has_pixels = masks.reshape(len(keep), h * w).any(1)
    return masks[has_pixels], cats[keep][has_pixels], sem_seg
