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

import logging
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modeling.heads import SoftMasks
from ..modeling.postprocessing import matrix_nms

logger = logging.getLogger(__name__)

__all__ = ["SOLOExportable", "postprocess_traceable"]


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

    scores = matrix_nms(labels, hard, areas, scores, kernel=nms_kernel, sigma=nms_sigma)
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


class SOLOExportable(nn.Module):
    """A SOLO-family model's inference as ``image -> (scores, classes, masks)``, for tracing.

    Input: ``image`` float32 (3, H, W), BGR 0-255 (what the model gets as ``"image"``), or
    (B, 3, H, W) when built with ``batch_size=B``. Outputs, sorted by descending score per image:
    ``scores`` (N,) float32, ``classes`` (N,) int64, ``masks`` (N, H, W) bool at the input size,
    and with a batch also ``image_index`` (N,) int64, the image of each detection (detections of
    image 0 first).

    The results equal ``model([{"image": image}])`` (each image of a batch gives what it gives
    alone: all have the same size, so the same padded canvas). Only Matrix NMS is supported
    (``MODEL.SOLO.NMS_TYPE: "matrix"``): the greedy mask NMS is a sequential loop. Of a panoptic
    model only the instances are exported (a warning says so): its stuff branch and the merge of
    things and stuff are not.
    """

    def __init__(self, model: nn.Module, batch_size: Optional[int] = None):
        """
        Args:
            model: a SOLO-family META_ARCH of ``solo_d2.modeling`` (its weights are shared).
            batch_size: None for a (3, H, W) input, else the fixed B of a (B, 3, H, W) input.
        """
        super().__init__()
        for attr in ("predict", "read_cells", "inference_args", "cell_strides"):
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
        if getattr(model, "stuff_head", None) is not None:
            logger.warning(
                "Exporting the instances of a panoptic model: the stuff branch and the "
                "panoptic merge are not part of the exported graph"
            )
        self.model = model
        self.batch_size = batch_size
        self.size_divisibility = max(model.backbone.size_divisibility, 1)
        keys = ("score_threshold", "mask_threshold", "nms_pre", "update_threshold", "chunk_size")
        self.postprocess_args = {k: args[k] for k in keys}
        self.postprocess_args.update(
            nms_kernel=args["nms_kernel"],
            nms_sigma=args["nms_sigma"],
            max_per_image=args["max_per_image"],
        )

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
        cate, soft_masks = self.model.read_cells(self.model.predict(x), canvas_hw)
        outputs = [
            postprocess_traceable(
                cate[i], soft_masks[i], self.model.cell_strides, canvas_hw, (h, w),
                **self.postprocess_args,
            )
            for i in range(self.batch_size or 1)  # fixed when exported
        ]  # fmt: skip
        if self.batch_size is None:
            return outputs[0]
        scores, classes, masks = (torch.cat(t) for t in zip(*outputs))
        image_index = torch.cat(
            [torch.full_like(s, i, dtype=torch.int64) for i, (s, _, _) in enumerate(outputs)]
        )
        return scores, classes, masks, image_index
