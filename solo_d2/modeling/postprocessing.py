"""SOLO-family inference post-processing: one path for every variant.

Points NMS, soft masks of the candidate cells (read by the variant's head: see
``SOLOHead.soft_mask_fn``), the area filter and maskness rescoring, Matrix NMS (or mask NMS),
top-k, resizing to the output size and boxes from the masks (Wang et al., SOLOv2, NeurIPS 2020,
§4; the reference code is WXinlong/SOLO).

Shape shorthand:
    B: images     C: classes     G: grid cells of all levels (sum of S_l^2)     E: kernel length
    N: candidates (cell, class) pairs    Hf, Wf: mask size at the mask stride (of the padded
    canvas)    H, W: output image size
Cells of all levels are indexed together: level-major, then row-major (i * S_l + j) in a level.
"""

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances
from torch import Tensor

__all__ = [
    "point_nms",
    "matrix_nms",
    "matrix_nms_decay",
    "mask_nms",
    "masks_to_boxes",
    "resize_masks",
    "cell_levels",
    "category_scores",
    "cell_strides",
    "select_detections",
    "solo_postprocess",
]


def point_nms(heat: Tensor) -> Tensor:
    """Keep a cell's scores only where they equal the max of its 2x2 window to the up-left.

    The reference pools with kernel 2, stride 1, padding 1 and crops ``[:-1, :-1]``, so each cell
    is compared with its up, left and up-left neighbours only (asymmetric, kept for parity).

    Args:
        heat: (B, C, S, S) probabilities.
    Returns:
        (B, C, S, S) with suppressed entries set to 0.
    """
    # the same maximum as max_pool2d(kernel 2, stride 1, padding 1)[:-1, :-1], from shifted
    # slices: 4x faster on many channels (LVIS's 1203 classes: 157 -> 37 ms, docs/lvis.md)
    p = F.pad(heat, (1, 0, 1, 0), value=float("-inf"))
    hmax = torch.maximum(
        torch.maximum(p[:, :, 1:, 1:], p[:, :, :-1, 1:]),
        torch.maximum(p[:, :, 1:, :-1], p[:, :, :-1, :-1]),
    )
    return heat * (hmax == heat).to(heat.dtype)


# Most float values _intersections converts at once (16 MB): bounds the float copy of the masks.
INTERSECTION_BLOCK_FLOATS = 2**22


def _intersections(masks: Tensor) -> Tensor:
    """(N, N) float32 pixel counts of the pairwise intersections of binary masks.

    A float32 matrix product, exact (0/1 products, integer partial sums below 2**24 per block).
    Bool masks, in eager mode, are converted and multiplied a block of pixels at a time and the
    products summed, so the float copy stays within ``INTERSECTION_BLOCK_FLOATS`` values for any
    image size at about the speed of one product. ``torch._int_mm`` (int8 with int32 sums) is not
    used: on an AVX2 CPU it is 17-50x slower than the float32 product (500 masks of 200 x 336:
    35 s against 0.65 s, AMD EPYC, docs/benchmarks.md).
    """
    m = masks.flatten(1)
    if m.dtype != torch.bool or torch.jit.is_tracing():
        m = m.to(torch.float32)
        return m @ m.T
    n, k = m.shape
    cols = max(1024, INTERSECTION_BLOCK_FLOATS // max(n, 1))
    out = m.new_zeros((n, n), dtype=torch.float32)
    for start in range(0, k, cols):
        block = m[:, start : start + cols].to(torch.float32)
        out.addmm_(block, block.T)
    return out


def _mask_iou(masks: Tensor, areas: Tensor, labels: Tensor) -> Tensor:
    """(N, N) upper-triangular same-class IoU: entry [i, j] (i < j) is IoU(i, j) if same class."""
    inter = _intersections(masks)
    union = areas[None, :] + areas[:, None] - inter
    iou = (inter / union).triu(diagonal=1)
    same = (labels[None, :] == labels[:, None]).triu(diagonal=1)
    return iou * same


def matrix_nms(
    labels: Tensor,
    masks: Tensor,
    areas: Tensor,
    scores: Tensor,
    *,
    kernel: str = "gaussian",
    sigma: float = 2.0,
) -> Tensor:
    """Matrix NMS: decay every score by its overlap with higher-scoring same-class masks.

    ``decay_j = min_i f(iou_ij) / f(max_k iou_ki)`` over higher-scoring i, with the reference
    code's Gaussian ``f(x) = exp(-sigma * x^2)`` or linear ``f(x) = 1 - x``. The linear form
    clamps its denominator so identical masks decay to 0 instead of giving NaN.

    Traceable (TorchScript / ONNX export): no data-dependent branch, and N = 0 gives an empty
    result. Bool masks are multiplied a block of pixels at a time in eager mode.

    Args:
        labels: (N,) classes.
        masks: (N, H, W) or (N, K) binary masks (bool, or 0/1 floats), by descending score.
        areas: (N,) mask areas (pixel counts).
        scores: (N,) scores, descending.
        kernel: "gaussian" or "linear".
        sigma: Gaussian parameter.
    Returns:
        (N,) decayed scores.
    """
    decay_iou = _mask_iou(masks, areas.to(torch.float32), labels)  # (N, N), [i, j], i above j
    return scores * matrix_nms_decay(decay_iou, kernel=kernel, sigma=sigma).to(scores.dtype)


def matrix_nms_decay(iou: Tensor, *, kernel: str = "gaussian", sigma: float = 2.0) -> Tensor:
    """Matrix NMS decay factors from the pairwise IoUs; no data-dependent branch (traceable).

    ``decay_j = min_i f(iou_ij) / f(max_k iou_ki)``. One neutral row is added to each of the two
    column reductions so that they are defined for N = 0 without changing any value: zeros for
    the max over IoUs (IoUs are >= 0) and ones for the min over decay factors (row 0 already
    holds values <= 1, the top mask having no compensation).

    Args:
        iou: (N, N) upper-triangular same-class IoU, [i, j] for i scoring above j.
        kernel: "gaussian" (``f(x) = exp(-sigma * x^2)``) or "linear" (``f(x) = 1 - x``).
        sigma: Gaussian parameter.
    Returns:
        (N,) factors in [0, 1] to multiply the scores by.
    """
    n = iou.shape[1:]
    compensate = torch.cat([iou.new_zeros((1,) + n), iou]).max(dim=0).values[:, None]  # (N, 1)
    if kernel == "gaussian":
        decay = torch.exp(-sigma * (iou**2 - compensate**2))
    elif kernel == "linear":
        decay = (1 - iou) / (1 - compensate).clamp(min=1e-6)
    else:
        raise ValueError(f"Matrix NMS kernel must be 'gaussian' or 'linear', got {kernel!r}")
    return torch.cat([decay.new_ones((1,) + n), decay]).min(dim=0).values


def mask_nms(
    labels: Tensor, masks: Tensor, areas: Tensor, scores: Tensor, *, iou_threshold: float = 0.5
) -> Tensor:
    """Sequential (greedy) mask NMS, the reference's ``NMS_TYPE="mask"`` alternative.

    Args:
        labels, masks, areas, scores: as :func:`matrix_nms` (sorted by descending score).
        iou_threshold: a mask is removed when its IoU with a kept higher same-class mask exceeds it.
    Returns:
        (N,) bool keep mask.
    """
    n = len(labels)
    keep = torch.ones(n, dtype=torch.bool, device=labels.device)
    if n == 0:
        return keep
    suppress = (_mask_iou(masks, areas.to(torch.float32), labels) > iou_threshold).cpu()
    keep_cpu = keep.cpu()
    for i in range(n):  # greedy order dependency: only kept masks suppress
        if keep_cpu[i]:
            keep_cpu &= ~suppress[i]
    return keep_cpu.to(labels.device)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight XYXY boxes of binary masks (detectron2 convention: x2 = last column + 1).

    Args:
        masks: (N, H, W) bool.
    Returns:
        (N, 4) float32; an empty mask gives (0, 0, 0, 0).
    """
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.float32, device=masks.device)
    if masks.dtype == torch.bool:  # max of the bytes: the same as any(), several times faster
        cols = masks.view(torch.uint8).amax(dim=1).bool()  # (N, W)
        rows = masks.view(torch.uint8).amax(dim=2).bool()  # (N, H)
    else:
        cols, rows = masks.any(dim=1), masks.any(dim=2)
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    x1 = torch.where(cols, xs, w).min(dim=1).values
    x2 = torch.where(cols, xs, -1).max(dim=1).values + 1
    y1 = torch.where(rows, ys, h).min(dim=1).values
    y2 = torch.where(rows, ys, -1).max(dim=1).values + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1).to(torch.float32)
    return boxes * cols.any(dim=1, keepdim=True)


# Most float values resize_masks holds at once (128 MB): bounds its memory on very large images.
RESIZE_MAX_FLOATS = 2**25
# Float values of the masks resize_masks resizes together by default (16 MB, 4 masks of
# 800 x 1344): thresholded while still in cache, and few calls at small sizes (27 at 320 x 480).
RESIZE_CHUNK_FLOATS = 2**22


def resize_masks(
    soft_masks: Tensor,
    canvas_hw: Tuple[int, int],
    image_hw: Tuple[int, int],
    output_hw: Tuple[int, int],
    threshold: float,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Soft masks at the feature stride -> binary masks at the original image size.

    Upsample to the padded canvas, crop the image's own region, resize to the output size, then
    threshold; bilinear with align_corners=False as the reference. Done in chunks of masks so that
    a very large output image only ever holds ``chunk_size`` float masks, and fewer (down to one)
    when they would exceed ``RESIZE_MAX_FLOATS`` values (an 8000 x 6000 image: one at a time).
    By default a chunk holds about ``RESIZE_CHUNK_FLOATS`` values: on CPU, 4 masks of 800 x 1344
    are thresholded while still in cache, where 16 would go to memory and back, and small outputs
    take few calls.

    Args:
        soft_masks: (N, Hf, Wf) probabilities.
        canvas_hw: padded canvas size (Hf * stride, Wf * stride).
        image_hw: (h, w) of the image inside the canvas (the model input).
        output_hw: (H, W) requested output size.
        threshold: binarisation threshold.
    Returns:
        (N, H, W) bool.
    """
    h, w = image_hw
    out = torch.empty((len(soft_masks), *output_hw), dtype=torch.bool, device=soft_masks.device)
    pixels = max(output_hw[0] * output_hw[1], canvas_hw[0] * canvas_hw[1], 1)
    if chunk_size is None:
        chunk_size = RESIZE_CHUNK_FLOATS // pixels
    chunk_size = max(1, min(chunk_size, RESIZE_MAX_FLOATS // pixels))
    for start in range(0, len(soft_masks), chunk_size):
        m = soft_masks[start : start + chunk_size].unsqueeze(0)
        m = F.interpolate(m, size=canvas_hw, mode="bilinear")[:, :, :h, :w]
        if (h, w) != tuple(output_hw):  # the same size would be an exact identity: skip it
            m = F.interpolate(m, size=output_hw, mode="bilinear")
        torch.gt(m[0], threshold, out=out[start : start + chunk_size])
    return out


# Soft-mask values scored together on CPU (4 MB of floats): a block stays in cache across the
# few passes over it (16 masks of 200 x 336 at 800 x 1344; 109 of 80 x 120 at 320 x 480, where
# blocks of 16 made 7 small operations per 16 masks, each a thread synchronisation).
SCORE_BLOCK_FLOATS = 2**20


def _score_masks(
    soft: Tensor, threshold: float, blocked: bool
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Areas of the binary masks ``soft > threshold`` and the sums of the soft values inside.

    Args:
        soft: (n, Hf, Wf) probabilities.
        blocked: score cache-sized blocks of masks (``SCORE_BLOCK_FLOATS``; eager on the CPU),
            also returning the binary masks; False: all at once, without them (traceable: no
            loop over ``n``).
    Returns:
        area (n,) and soft_sum (n,) in soft's dtype; hard (n, Hf, Wf) bool, or None when not
        ``blocked``.
    """
    if not blocked:
        inside = (soft - threshold).sign().clamp(min=0)  # 1.0 where soft > threshold, else 0.0
        return inside.sum(dim=(1, 2)), (inside * soft).sum(dim=(1, 2)), None
    n, hf, wf = soft.shape
    hard = torch.empty(soft.shape, dtype=torch.bool, device=soft.device)
    area, soft_sum = soft.new_empty(n), soft.new_empty(n)
    bounds = list(range(0, n, max(1, SCORE_BLOCK_FLOATS // max(hf * wf, 1))))
    if len(bounds) > 1 and n - bounds[-1] == 1:
        bounds.pop()  # no 1-row block: torch splits a 1-row sum across threads (other rounding)
    for a, b in zip(bounds, bounds[1:] + [n]):
        s, h = soft[a:b], hard[a:b]
        torch.gt(s, threshold, out=h)
        area[a:b] = h.sum(dim=(1, 2))  # exact pixel counts
        soft_sum[a:b] = torch.where(h, s, 0.0).sum(dim=(1, 2))
    return area, soft_sum, hard


def _take_rows(chunks: List[Tensor], index: Tensor, chunk_size: int) -> Tensor:
    """Rows ``index`` of ``torch.cat(chunks)`` (every chunk but the last has ``chunk_size`` rows),
    gathered without concatenating the chunks."""
    if len(chunks) == 1:
        return chunks[0][index]
    out = chunks[0].new_empty((len(index), *chunks[0].shape[1:]))
    which = torch.div(index, chunk_size, rounding_mode="floor")
    for k, chunk in enumerate(chunks):
        sel = (which == k).nonzero(as_tuple=True)[0]
        if len(sel):
            out[sel] = chunk[index[sel] - k * chunk_size]
    return out


def cell_levels(cells: Tensor, num_grids: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """Split indices into the concatenated cells of all levels (traceable: comparisons, no
    ``bucketize``, which has no ONNX form).

    Args:
        cells: (n,) int64 in [0, sum S_l^2).
        num_grids: S_l per level.
    Returns:
        levels: (n,) level of each cell; local: (n,) index ``i * S_l + j`` inside its level.
    """
    sizes = torch.tensor([s * s for s in num_grids], device=cells.device)
    ends = sizes.cumsum(0)
    levels = (cells[:, None] >= ends[None, :]).sum(dim=1)
    return levels, cells - (ends - sizes)[levels]


def category_scores(cate_logits: List[Tensor]) -> Tensor:
    """Category probabilities after points NMS, the cells of all levels concatenated.

    Args:
        cate_logits: L tensors (B, C, S_l, S_l).
    Returns:
        (B, G, C), cells level-major, then row-major (``i * S_l + j``) inside a level.
    """
    b, c = cate_logits[0].shape[:2]
    return torch.cat(
        [point_nms(x.sigmoid()).permute(0, 2, 3, 1).reshape(b, -1, c) for x in cate_logits], dim=1
    )


def cell_strides(num_grids: Sequence[int], strides: Sequence[int]) -> Tensor:
    """(G,) float32 instance stride of every cell's level (the area filter's minimum area)."""
    return torch.cat(
        [torch.full((s * s,), st, dtype=torch.float32) for s, st in zip(num_grids, strides)]
    )


def select_detections(
    cate_scores: Tensor,
    soft_masks: Callable[[Tensor], Tensor],
    cell_strides: Tensor,
    *,
    score_threshold: float,
    mask_threshold: float,
    nms_pre: int,
    update_threshold: float,
    nms_type: str,
    nms_kernel: str,
    nms_sigma: float,
    max_per_image: int,
    chunk_size: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The post-processing core, shared by eager inference (:func:`solo_postprocess`) and export
    (``solo_d2.export.SOLOExportable``): score threshold, one soft mask per candidate cell, area
    filter and maskness rescoring, top ``nms_pre``, NMS, top ``max_per_image``.

    Traceable with ``nms_type="matrix"``: no Python branch or loop depends on the data, and every
    step is defined when nothing is left (empty outputs, no early return). Memory stays bounded
    however many cells pass the score threshold: their masks are scored ``chunk_size`` at a time.
    The chunks' masks are kept for the later steps when the cells are few (soft masks of at most
    ``max(nms_pre, chunk_size)`` cells, binary ones of ``4 * nms_pre``; then only the final
    detections' soft masks are computed again); otherwise, and always when traced (the count is
    not known when the trace is recorded), the binary masks of the ``nms_pre`` best candidates are
    computed again a chunk at a time, and the final detections' soft masks once more.
    Mask NMS (``nms_type="mask"``) is a greedy sequential loop: eager only.

    Args:
        cate_scores: (G, C) category probabilities after points NMS, levels concatenated,
            cells row-major.
        soft_masks: f(cells) -> (n, Hf, Wf) mask probabilities of cells (indices into G) at the
            mask stride of the padded canvas (the variant's head provides it), n = 0 included.
        cell_strides: (G,) instance stride of each cell's level (area filter).
    Returns:
        scores (N,) descending, classes (N,) int64 and soft masks (N, Hf, Wf); N <= max_per_image.
    """
    tracing = torch.jit.is_tracing()
    num_cells, num_classes = cate_scores.shape
    passed = cate_scores > score_threshold  # (G, C)
    candidates = passed.reshape(-1).nonzero()[:, 0]  # (N0,) indices into G * C, row-major
    cells = torch.div(candidates, num_classes, rounding_mode="floor")
    labels = candidates - cells * num_classes
    scores = cate_scores.reshape(-1)[candidates]

    # 1) a mask belongs to a cell, not to a (cell, class) pair: one per cell with a candidate
    # (common with LVIS's 1203 classes: a cell passes in several), scored chunk by chunk
    cell_passed = passed.any(dim=1)  # (G,)
    mask_cells = cell_passed.nonzero()[:, 0]  # (M,) ascending
    slots = (torch.cumsum(cell_passed.to(torch.int64), 0) - 1)[cells]  # (N0,) rows of mask_cells
    # traced: a fixed count of chunks; eager: at least one, for the masks' shape when none passed
    num = num_cells if tracing else max(len(mask_cells), 1)
    # eager, few cells (the usual case): keep their masks for the later steps instead of
    # computing them again, while memory stays within what recomputing would hold anyway (the
    # float masks of nms_pre candidates): soft masks of up to nms_pre cells, binary ones (a
    # quarter of the bytes) of up to 4 * nms_pre
    keep_soft = not tracing and num <= max(nms_pre, chunk_size)
    keep_hard = not tracing and num <= max(4 * nms_pre, chunk_size)
    blocked = cate_scores.device.type == "cpu" and not tracing
    cell_areas, cell_sums, soft_chunks, hard_chunks = [], [], [], []
    for start in range(0, num, chunk_size):
        soft = soft_masks(mask_cells[start : start + chunk_size])  # (<= chunk_size, Hf, Wf)
        area, soft_sum, hard = _score_masks(soft, mask_threshold, blocked)
        cell_areas.append(area)
        cell_sums.append(soft_sum)
        if keep_soft:
            soft_chunks.append(soft)
        if keep_hard:
            hard_chunks.append(hard if hard is not None else soft > mask_threshold)
        del soft, hard
    cell_area = torch.cat(cell_areas)
    areas = cell_area[slots]
    maskness = (torch.cat(cell_sums) / cell_area.clamp(min=1))[slots]

    # area filter, maskness rescoring, top nms_pre
    kept = (areas > cell_strides[cells]).nonzero()[:, 0]
    scores = scores[kept] * maskness[kept]
    order = torch.argsort(scores, descending=True)[:nms_pre]
    selected = kept[order]
    scores, labels, areas, rows = scores[order], labels[selected], areas[selected], slots[selected]
    if keep_hard:
        hard = _take_rows(hard_chunks, rows, chunk_size)
        del hard_chunks
    else:  # the binary masks of the nms_pre best, a chunk at a time (their soft ones not kept)
        starts = range(0, max(nms_pre, 1), chunk_size)
        chunks = [soft_masks(mask_cells[rows[s : s + chunk_size]]) > mask_threshold for s in starts]
        hard = torch.cat(chunks)  # (<= nms_pre, Hf, Wf)
        del chunks

    # 2) NMS, top max_per_image
    if nms_type == "matrix":
        scores = matrix_nms(labels, hard, areas, scores, kernel=nms_kernel, sigma=nms_sigma)
        keep = scores >= update_threshold
    elif nms_type == "mask":
        keep = mask_nms(labels, hard, areas, scores, iou_threshold=mask_threshold)
    else:
        raise ValueError(f"MODEL.SOLO.NMS_TYPE must be 'matrix' or 'mask', got {nms_type!r}")
    final = keep.nonzero()[:, 0]
    final = final[torch.argsort(scores[final], descending=True)[:max_per_image]]
    if keep_soft:
        soft = _take_rows(soft_chunks, rows[final], chunk_size)
    else:
        soft = soft_masks(mask_cells[rows[final]])  # (<= max_per_image, Hf, Wf)
    return scores[final], labels[final], soft


@torch.no_grad()
def solo_postprocess(
    cate_scores: Tensor,
    soft_masks: Callable[[Tensor], Tensor],
    cell_strides: Tensor,
    canvas_hw: Tuple[int, int],
    image_hw: Tuple[int, int],
    output_hw: Tuple[int, int],
    **kwargs,
) -> Instances:
    """From one image's head outputs to final ``Instances``, any variant: the core
    (:func:`select_detections`), then what export leaves out: masks resized to the output size
    and boxes from the masks.

    Args:
        cate_scores, soft_masks, cell_strides: as :func:`select_detections`.
        canvas_hw: padded canvas size (Hf, Wf times the mask stride).
        image_hw: (h, w) of the model input inside the padded canvas.
        output_hw: (H, W) size of the returned masks.
        kwargs: the keyword arguments of :func:`select_detections`.
    Returns:
        Instances of size output_hw with pred_masks (N, H, W) bool, pred_boxes, scores,
        pred_classes (int64), sorted by descending score, N <= max_per_image.
    """
    scores, labels, soft = select_detections(cate_scores, soft_masks, cell_strides, **kwargs)
    masks = resize_masks(soft, canvas_hw, image_hw, output_hw, kwargs["mask_threshold"])
    result = Instances(output_hw)
    result.pred_masks = masks
    result.pred_boxes = Boxes(masks_to_boxes(masks))
    result.scores = scores
    result.pred_classes = labels
    return result
