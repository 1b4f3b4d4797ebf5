"""SOLO inference as one traceable function of the image tensor (TorchScript and ONNX export).

:class:`SOLOExportable` wraps a built SOLO-family model (``solo_d2.modeling``) and computes what
its eval-mode ``forward`` computes for ``[{"image": image}]``: normalisation, padding, backbone,
heads, points NMS, score threshold, the candidates' soft masks, area filter and maskness
rescoring, top-k, Matrix NMS, top-k and mask upsampling. It uses tensor operations only: no Python
branch or loop depends on the data, so a trace recorded on one image is valid for every image and
every input size. Candidate counts are data dependent; they are expressed with ``nonzero``, index
selection and ``argsort``, which export to the standard ONNX ops NonZero, Gather and TopK, and
every step is well defined when nothing is left (empty outputs instead of an early return).

Shape shorthand:
    B: images (fixed when exported)    H, W: input size    C: classes    G: grid cells of all levels
    E: kernel length    Hf, Wf: mask size at the mask stride (4) of the input padded to 32
    N0: candidates (cell, class) above the score threshold    M: their distinct cells
    N: detections
"""

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modeling.postprocessing import matrix_nms_decay, point_nms

__all__ = [
    "SOLOExportable",
    "matrix_nms_traceable",
    "postprocess_traceable",
    "soft_mask_function",
]

SoftMasks = Callable[[Tensor], Tensor]


def matrix_nms_traceable(
    labels: Tensor,
    masks: Tensor,
    areas: Tensor,
    scores: Tensor,
    *,
    kernel: str = "gaussian",
    sigma: float = 2.0,
) -> Tensor:
    """:func:`solo_d2.modeling.postprocessing.matrix_nms` without its early return for N = 0.

    The decay is :func:`~solo_d2.modeling.postprocessing.matrix_nms_decay`; the intersections are a
    float32 product here (the eager function's int8 product does not export).

    Args:
        labels: (N,) classes.
        masks: (N, K) binary masks (flattened; bool or 0/1 floats), by descending score.
        areas: (N,) mask areas (pixel counts), float.
        scores: (N,) scores, descending.
        kernel: "gaussian" or "linear".
        sigma: Gaussian parameter.
    Returns:
        (N,) decayed scores.
    """
    m = masks.to(torch.float32)
    inter = m @ m.T  # (N, N)
    union = areas[None, :] + areas[:, None] - inter
    same = (labels[None, :] == labels[:, None]).to(torch.float32)
    iou = (inter / union * same).triu(diagonal=1)  # [i, j]: i scores above j
    return scores * matrix_nms_decay(iou, kernel=kernel, sigma=sigma).to(scores.dtype)


def postprocess_traceable(
    cate_scores: Tensor,
    soft_masks: SoftMasks,
    cell_strides: Tensor,
    canvas_hw: Tuple[int, int],
    image_hw: Tuple[int, int],
    *,
    score_threshold: float,
    mask_threshold: float,
    nms_pre: int,
    update_threshold: float,
    nms_kernel: str,
    nms_sigma: float,
    max_per_image: int,
    chunk_size: int = 256,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One image's head outputs to final detections at the input size, without data-dependent
    Python control flow (the traceable form of ``solo_postprocess`` with Matrix NMS).

    As the eager function, areas and maskness are computed ``chunk_size`` masks at a time, so
    memory stays bounded however many cells pass the score threshold: the chunks are a fixed
    number of slices (ceil(G / chunk_size), G is fixed by the grids), empty ones cost nothing.
    Each cell's mask is computed once, however many of its classes pass.

    Args:
        cate_scores: (G, C) category probabilities after points NMS (levels concatenated, cells
            row-major).
        soft_masks: f(cells) -> (n, Hf, Wf) mask probabilities, traceable, n = 0 included.
        cell_strides: (G,) instance stride of each cell's level (area filter).
        canvas_hw: padded canvas size (Hf, Wf times the mask stride).
        image_hw: (h, w) of the input inside the canvas; the masks are returned at this size.
    Returns:
        scores (N,) float32 descending, classes (N,) int64, masks (N, h, w) bool;
        N <= max_per_image.
    """
    num_classes = cate_scores.shape[1]
    flat = cate_scores.reshape(-1)
    passed = cate_scores > score_threshold  # (G, C)
    candidates = passed.reshape(-1).nonzero()[:, 0]  # (N0,) indices into G * C, row-major
    cells = torch.div(candidates, num_classes, rounding_mode="floor")
    labels = candidates - cells * num_classes
    scores = flat[candidates]

    # a mask belongs to a cell, not to a (cell, class) pair: compute it once per cell that has a
    # candidate (M <= N0 of them), then read areas and maskness per candidate
    cell_passed = passed.any(dim=1)  # (G,)
    mask_cells = cell_passed.nonzero()[:, 0]  # (M,) ascending
    slots = (torch.cumsum(cell_passed.to(torch.int64), 0) - 1)[cells]  # (N0,) rows of mask_cells
    cell_areas, cell_maskness = [], []
    for start in range(0, cate_scores.shape[0], chunk_size):  # fixed count: G is static
        soft = soft_masks(mask_cells[start : start + chunk_size])  # (<= chunk_size, Hf, Wf)
        soft = soft.flatten(1)
        hard = (soft > mask_threshold).to(soft.dtype)  # 0/1 floats: cheaper to sum than bools
        area = hard.sum(dim=1)
        cell_areas.append(area)
        cell_maskness.append((soft * hard).sum(dim=1) / area.clamp(min=1))
    areas, maskness = torch.cat(cell_areas)[slots], torch.cat(cell_maskness)[slots]

    # area filter, maskness rescoring, top nms_pre
    kept = (areas > cell_strides[cells]).nonzero()[:, 0]
    scores = scores[kept] * maskness[kept]
    order = torch.argsort(scores, descending=True)[:nms_pre]
    selected = kept[order]
    scores, labels, areas = scores[order], labels[selected], areas[selected]
    soft = soft_masks(mask_cells[slots[selected]])  # (<= nms_pre, Hf, Wf)
    hf, wf = soft.shape[-2:]
    soft = soft.reshape(-1, hf * wf)
    hard = (soft > mask_threshold).to(soft.dtype)

    scores = matrix_nms_traceable(labels, hard, areas, scores, kernel=nms_kernel, sigma=nms_sigma)
    kept = (scores >= update_threshold).nonzero()[:, 0]
    scores, labels, soft = scores[kept], labels[kept], soft[kept]
    order = torch.argsort(scores, descending=True)[:max_per_image]
    scores, labels, soft = scores[order], labels[order], soft[order]

    # upsample to the padded canvas and crop the image (the output size is the input size);
    # masks along the batch axis: upsampling accepts an empty batch, not empty channels
    h, w = image_hw
    soft = F.interpolate(soft.reshape(-1, 1, hf, wf), size=canvas_hw, mode="bilinear")
    masks = soft[:, 0, :h, :w] > mask_threshold
    return scores, labels, masks


def _cell_levels(cells: Tensor, num_grids: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """Level of each index into the concatenated cells of all levels, and its index inside the
    level (``postprocessing.cell_levels`` with comparisons instead of ``bucketize``, which has no
    ONNX form)."""
    sizes = torch.tensor([s * s for s in num_grids], device=cells.device)
    ends = sizes.cumsum(0)
    levels = (cells[:, None] >= ends[None, :]).sum(dim=1)
    return levels, cells - (ends - sizes)[levels]


def _dynamic_conv_masks(mask_preds: List[Tensor], mask_feat: Tensor, image: int) -> SoftMasks:
    # SOLOv2: (E, S, S) kernels per level -> (G, E); masks = sigmoid(kernels @ features)
    e, hf, wf = mask_feat[image].shape
    kernels = torch.cat([k[image].permute(1, 2, 0).reshape(-1, e) for k in mask_preds])
    feat = mask_feat[image].reshape(e, hf * wf)
    return lambda cells: torch.sigmoid(kernels[cells] @ feat).reshape(-1, hf, wf)


def _level_masks(
    mask_preds: List[Tensor], image: int, num_grids: Sequence[int], out_hw: Tuple[int, int]
) -> SoftMasks:
    # SOLO v1: cell k of level l is map k of (S_l^2, h_l, w_l), sigmoid, resized to the canvas
    maps = [m[image] for m in mask_preds]

    def soft_masks(cells: Tensor) -> Tensor:
        levels, local = _cell_levels(cells, num_grids)
        out = maps[0].new_zeros((cells.shape[0],) + tuple(out_hw))
        for level, m in enumerate(maps):  # the fixed levels; empty selections are fine
            sel = (levels == level).nonzero()[:, 0]
            probs = m[local[sel]].sigmoid()[:, None]
            resized = F.interpolate(probs, size=out_hw, mode="bilinear")[:, 0]
            out = out.index_put((sel,), resized)
        return out

    return soft_masks


def _decoupled_masks(
    mask_preds: List[Tensor], image: int, num_grids: Sequence[int], out_hw: Tuple[int, int]
) -> SoftMasks:
    # Decoupled SOLO: level l gives (2, S_l, h_l, w_l) X and Y maps; cell (i, j) = Y[i] * X[j]
    up = [F.interpolate(m[image].sigmoid(), size=out_hw, mode="bilinear") for m in mask_preds]
    x_probs = torch.cat([u[0] for u in up])  # (sum S_l, Hf, Wf)
    y_probs = torch.cat([u[1] for u in up])

    def soft_masks(cells: Tensor) -> Tensor:
        levels, local = _cell_levels(cells, num_grids)
        grids = torch.tensor(list(num_grids), device=cells.device)
        offsets = (grids.cumsum(0) - grids)[levels]
        s = grids[levels]
        rows = torch.div(local, s, rounding_mode="floor")
        cols = local - rows * s
        return x_probs[cols + offsets] * y_probs[rows + offsets]

    return soft_masks


def soft_mask_function(
    head: nn.Module,
    mask_preds: List[Tensor],
    mask_feat: Optional[Tensor],
    image: int,
    out_hw: Tuple[int, int],
) -> SoftMasks:
    """The traceable f(cells) -> (n, Hf, Wf) soft masks of one image, for the head's variant.

    The same computation as the head's ``soft_mask_fn`` (eager inference), written with
    comparisons, nonzero and index_put only, so that it traces and exports for any n, n = 0
    included.

    Raises:
        NotImplementedError: a head of no known variant.
    """
    name = type(head).__name__
    if getattr(head, "uses_mask_features", mask_feat is not None) or name == "SOLOv2InstanceHead":
        return _dynamic_conv_masks(mask_preds, mask_feat, image)
    if name in ("DecoupledSOLOInstanceHead", "DecoupledSOLOLightInstanceHead"):
        return _decoupled_masks(mask_preds, image, head.num_grids, out_hw)
    if name == "SOLOInstanceHead":
        return _level_masks(mask_preds, image, head.num_grids, out_hw)
    raise NotImplementedError(
        f"no traceable mask reading for the instance head {name}: export supports SOLOv2, SOLO, "
        "Decoupled SOLO and Decoupled SOLO light heads"
    )


class SOLOExportable(nn.Module):
    """A SOLO-family model's inference as ``image -> (scores, classes, masks)``, for tracing.

    Input: ``image`` float32 (3, H, W), BGR 0-255 (what the model gets as ``"image"``), or
    (B, 3, H, W) when built with ``batch_size=B``. Outputs, sorted by descending score per image:
    ``scores`` (N,) float32, ``classes`` (N,) int64, ``masks`` (N, H, W) bool at the input size,
    and with a batch also ``image_index`` (N,) int64, the image of each detection (detections of
    image 0 first).

    The results equal ``model([{"image": image}])`` (each image of a batch gives what it gives
    alone: all have the same size, so the same padded canvas). Only Matrix NMS is supported
    (``MODEL.SOLO.NMS_TYPE: "matrix"``): the greedy mask NMS is a sequential loop.
    """

    def __init__(self, model: nn.Module, batch_size: Optional[int] = None):
        """
        Args:
            model: a SOLO-family META_ARCH of ``solo_d2.modeling`` (its weights are shared).
            batch_size: None for a (3, H, W) input, else the fixed B of a (B, 3, H, W) input.
        """
        super().__init__()
        for attr in ("predict", "ins_head", "inference_args", "instance_strides", "mask_stride"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"{type(model).__name__} is not a SOLO-family model of solo_d2 (no {attr!r}); "
                    "export supports MODEL.META_ARCHITECTURE 'SOLO' / 'SOLOv2'"
                )
        args = dict(model.inference_args)
        if args["nms_type"] != "matrix":
            raise ValueError(
                f"MODEL.SOLO.NMS_TYPE={args['nms_type']!r} cannot be exported: only 'matrix' is "
                "(greedy mask NMS is a data-dependent sequential loop)"
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be None or >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.size_divisibility = max(model.backbone.size_divisibility, 1)
        self.mask_stride = model.mask_stride
        keys = ("score_threshold", "mask_threshold", "nms_pre", "update_threshold", "chunk_size")
        self.postprocess_args = {k: args[k] for k in keys}
        self.postprocess_args.update(
            nms_kernel=args["nms_kernel"],
            nms_sigma=args["nms_sigma"],
            max_per_image=args["max_per_image"],
        )
        strides = [
            torch.full((s * s,), st, dtype=torch.float32)
            for s, st in zip(model.ins_head.num_grids, model.instance_strides)
        ]
        self.register_buffer("cell_strides", torch.cat(strides).to(model.pixel_mean.device), False)

    @property
    def output_names(self) -> List[str]:
        names = ["scores", "classes", "masks"]
        return names if self.batch_size is None else names + ["image_index"]

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        images = image.unsqueeze(0) if self.batch_size is None else image
        h, w = images.shape[-2:]
        x = (images - self.model.pixel_mean) / self.model.pixel_std
        div = self.size_divisibility
        x = F.pad(x, (0, (-w) % div, 0, (-h) % div))  # as ImageList.from_tensors, pad value 0
        canvas_hw = x.shape[-2:]
        out_hw = (canvas_hw[0] // self.mask_stride, canvas_hw[1] // self.mask_stride)
        cate_logits, mask_preds, mask_feat = self.model.predict(x)
        head = self.model.ins_head
        b, num_classes = x.shape[0], cate_logits[0].shape[1]
        # (B, G, C) scores after points NMS, levels concatenated, cells row-major
        cate = torch.cat(
            [
                point_nms(c.sigmoid()).permute(0, 2, 3, 1).reshape(b, -1, num_classes)
                for c in cate_logits
            ],
            dim=1,
        )
        outputs = []
        for i in range(self.batch_size or 1):  # fixed when exported
            soft_masks = soft_mask_function(head, mask_preds, mask_feat, i, out_hw)
            outputs.append(
                postprocess_traceable(
                    cate[i], soft_masks, self.cell_strides, canvas_hw, (h, w),
                    **self.postprocess_args,
                )
            )  # fmt: skip
        if self.batch_size is None:
            return outputs[0]
        scores, classes, masks = (torch.cat(t) for t in zip(*outputs))
        image_index = torch.cat(
            [torch.full_like(s, i, dtype=torch.int64) for i, (s, _, _) in enumerate(outputs)]
        )
        return scores, classes, masks, image_index
