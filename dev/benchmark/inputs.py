"""Deterministic synthetic inputs for benchmarks: images, training targets, Matrix NMS inputs,
and category logits that leave a chosen number of post-processing candidates."""

import math
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Instances
from torch import Tensor, nn

from solo_d2.modeling.postprocessing import point_nms
from solo_d2.modeling.targets import extra_mask_targets, instance_targets

__all__ = [
    "candidate_logits",
    "count_candidates",
    "inference_inputs",
    "mapper_targets",
    "matrix_nms_inputs",
    "random_masks",
    "synthetic_image",
    "training_inputs",
]

Device = Union[str, torch.device]


def synthetic_image(h: int, w: int, seed: int = 0) -> Tensor:
    """A deterministic (3, h, w) uint8 image: smooth colour blobs plus fine noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(h // 64, 2), max(w // 64, 2), generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
    noise = torch.rand(3, h, w, generator=g) * 0.25
    return ((smooth * 0.75 + noise).clamp(0, 1) * 255).to(torch.uint8)


def inference_inputs(batch: int, h: int, w: int, seed: int = 0) -> List[Dict]:
    """``batch`` model inputs of :func:`synthetic_image` (seeds ``seed``, ``seed + 1``, ...)."""
    return [
        {"image": synthetic_image(h, w, seed + i), "height": h, "width": w} for i in range(batch)
    ]


def random_masks(
    num: int, h: int, w: int, g: torch.Generator, min_size: float = 16.0, max_size: float = 0.0
) -> Tensor:
    """(num, h, w) bool masks, rectangles and ellipses (alternately) of log-uniform size
    sqrt(area) in [min_size, max_size] (default 0.8 * min(h, w)): objects of every level."""
    max_size = max_size or 0.8 * min(h, w)
    ys, xs = torch.arange(h)[:, None].float(), torch.arange(w)[None, :].float()
    masks = torch.zeros(num, h, w, dtype=torch.bool)
    for i in range(num):
        u = torch.rand(4, generator=g).tolist()
        size = math.exp(math.log(min_size) + u[0] * math.log(max_size / min_size))
        rx = size / 2 * (0.6 + 0.8 * u[1])
        ry = size * size / 4 / rx
        cx = rx + u[2] * max(w - 2 * rx, 1)
        cy = ry + u[3] * max(h - 2 * ry, 1)
        if i % 2:
            masks[i] = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
        else:
            masks[i] = ((xs - cx).abs() <= rx) & ((ys - cy).abs() <= ry)
    return masks


def mapper_targets(model: nn.Module, masks: Tensor) -> Instances:
    """The per-image target work of SOLODatasetMapper (its workers do it, not the model).

    Args:
        model: a SOLO-family model (its ``mask_stride`` and ``mask_strides``).
        masks: (N, H, W) bool instance masks.
    Returns:
        Instances with gt_boxes, gt_centers (N, 2) and the masks at each mask stride.
    """
    valid, centers, small = instance_targets(masks, model.mask_stride)
    inst = Instances(tuple(masks.shape[-2:]))
    inst.gt_boxes = BitMasks(masks).get_bounding_boxes()
    inst.gt_centers = centers
    inst.gt_masks_small = small
    for name, value in extra_mask_targets(masks, model.mask_stride, model.mask_strides).items():
        inst.set(name, value)
    return inst


def training_inputs(
    model: nn.Module, batch: int, h: int, w: int, num_instances: int, seed: int = 0
) -> Tuple[List[Dict], List[Tensor]]:
    """Training inputs as SOLODatasetMapper makes them: per image a (3, h, w) image and
    ``num_instances`` :func:`random_masks` instances with random classes.

    Returns:
        (inputs, masks): the inputs, and each image's (N, h, w) bool full-size masks.
    """
    g = torch.Generator().manual_seed(seed)
    num_classes = model.ins_head.num_classes
    inputs, all_masks = [], []
    for b in range(batch):
        masks = random_masks(num_instances, h, w, g)
        inst = mapper_targets(model, masks)
        inst.gt_classes = torch.randint(0, num_classes, (num_instances,), generator=g)
        inputs.append({"image": synthetic_image(h, w, seed + b), "instances": inst})
        all_masks.append(masks)
    return inputs, all_masks


def matrix_nms_inputs(
    num: int, h: int, w: int, seed: int = 0, device: Device = "cpu"
) -> List[Tensor]:
    """Inputs of ``matrix_nms`` as post-processing makes them.

    Returns:
        labels (num,) in 0..2, masks (num, h, w) bool, areas (num,) float, scores (num,) sorted
        in descending order.
    """
    g = torch.Generator().manual_seed(seed)
    masks = random_masks(num, h, w, g, min_size=4.0, max_size=0.9 * min(h, w))
    labels = torch.randint(0, 3, (num,), generator=g)
    scores = torch.rand(num, generator=g).sort(descending=True).values
    areas = masks.flatten(1).sum(dim=1).float()
    return [t.to(device) for t in (labels, masks, areas, scores)]


def candidate_logits(
    num_grids: Sequence[int],
    num_classes: int,
    num_candidates: int,
    batch: int = 1,
    seed: int = 0,
    device: Device = "cpu",
) -> List[Tensor]:
    """Category logits where exactly ``num_candidates`` (cell, class) pairs survive points NMS.

    Classes are filled in order (class 0's cells first, then class 1's, ...); in each used class
    every cell passes any score threshold below 0.15, but only the chosen cells are maxima of
    points NMS: chosen cells get scores in (0.2, 0.9) increasing in row-major order, the others
    scores just under 0.15 decreasing in row-major order, so each of those has an earlier (up,
    left or up-left) neighbour that is higher. Cell (0, 0) of each level is always chosen.

    Returns:
        per level, (batch, C, S, S) logits; unused classes get probability 1e-5.
    Raises:
        ValueError: ``num_candidates`` below the number of levels or above cells x classes.
    """
    num_cells = sum(s * s for s in num_grids)
    if not len(num_grids) <= num_candidates <= num_cells * num_classes:
        raise ValueError(
            f"num_candidates must be in [{len(num_grids)}, {num_cells * num_classes}] for grids "
            f"{list(num_grids)} and {num_classes} classes, got {num_candidates}"
        )
    g = torch.Generator().manual_seed(seed)
    starts = np.cumsum([0] + [s * s for s in num_grids])[:-1].tolist()
    first = torch.tensor(starts)
    others = torch.ones(num_cells, dtype=torch.bool)
    others[first] = False
    pick = others.nonzero(as_tuple=True)[0]
    rank = torch.arange(num_cells, dtype=torch.float32) / num_cells
    probs = torch.full((num_classes, num_cells), 1e-5)
    left = num_candidates
    for c in range(num_classes):
        k = min(left, num_cells)
        if k == 0:
            break
        chosen = torch.zeros(num_cells, dtype=torch.bool)
        chosen[first] = True
        extra = max(k - len(first), 0)
        chosen[pick[torch.randperm(len(pick), generator=g)[:extra]]] = True
        if k < len(first):  # fewer candidates than levels left for this class
            chosen[first[k:]] = False
        probs[c] = torch.where(chosen, 0.2 + 0.7 * rank, 0.149 - 0.04 * rank)
        left -= int(chosen.sum())
    logits = torch.logit(probs)
    out = []
    for s, start in zip(num_grids, starts):
        level = logits[:, start : start + s * s].reshape(1, num_classes, s, s)
        out.append(level.expand(batch, -1, -1, -1).contiguous().to(device))
    return out


def count_candidates(cate_logits: Sequence[Tensor], score_threshold: float) -> List[int]:
    """Per image, the (cell, class) pairs above ``score_threshold`` after points NMS.

    Args:
        cate_logits: per level, (B, C, S, S) category logits.
    """
    per_level = [
        (point_nms(c.sigmoid()) > score_threshold).flatten(1).sum(dim=1) for c in cate_logits
    ]
    return [int(n) for n in sum(per_level).tolist()]
