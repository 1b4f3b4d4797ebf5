"""SOLO inference as one traceable function of the image tensor (TorchScript and ONNX export).

:class:`SOLOExportable` wraps a built SOLO-family model (``solo_d2.modeling``) and computes what
its eval-mode ``forward`` computes for ``[{"image": image}]``: normalisation, padding, backbone,
heads, then the post-processing core that eager inference runs too
(:func:`solo_d2.modeling.postprocessing.select_detections`: score threshold, soft masks, area
filter and maskness rescoring, top-k, Matrix NMS, top-k), and mask upsampling to the input. No
Python branch or loop depends on the data, so a trace recorded on one image is valid for every
image and every input size. Candidate counts are data dependent; they are expressed with
``nonzero``, index selection and ``argsort``, which export to the standard ONNX ops NonZero,
Gather and TopK, and every step is well defined when nothing is left.

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

from ..modeling.postprocessing import select_detections

logger = logging.getLogger(__name__)

__all__ = ["SOLOExportable"]


class SOLOExportable(nn.Module):
    """A SOLO-family model's inference as ``image -> (scores, classes, masks)``, for tracing.

    Input: ``image`` float32 (3, H, W), BGR 0-255 (what the model gets as ``"image"``), or
    (B, 3, H, W) when built with ``batch_size=B``. Outputs, sorted by descending score per image:
    ``scores`` (N,) float32, ``classes`` (N,) int64, ``masks`` (N, H, W) bool at the input size,
    and with a batch also ``image_index`` (N,) int64, the image of each detection (detections of
    image 0 first). With ``soft_masks=True`` a last output ``soft_masks`` (N, Hf, Wf) float32
    holds the masks' probabilities at the mask stride of the padded canvas, from which a runtime
    resizes masks to another size exactly as the PyTorch model does
    (:func:`solo_d2.modeling.postprocessing.resize_masks`, the soft masks before thresholding).

    The results equal ``model([{"image": image}])`` (each image of a batch gives what it gives
    alone: all have the same size, so the same padded canvas). Only Matrix NMS is supported
    (``MODEL.SOLO.NMS_TYPE: "matrix"``): the greedy mask NMS is a sequential loop. Only the
    instances are exported: a model's other outputs (its ``unexported_outputs``, e.g. the
    panoptic segmentation of ``PanopticSOLO``) are not, and a warning names them.
    """

    def __init__(
        self, model: nn.Module, batch_size: Optional[int] = None, soft_masks: bool = False
    ):
        """
        Args:
            model: a SOLO-family META_ARCH of ``solo_d2.modeling`` (its weights are shared).
            batch_size: None for a (3, H, W) input, else the fixed B of a (B, 3, H, W) input.
            soft_masks: also return the soft masks at the mask stride (the last output).
        """
        super().__init__()
        for attr in ("predict", "read_cells", "inference_args", "cell_strides"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"{type(model).__name__} is not a SOLO-family model of solo_d2 (no {attr!r}); "
                    "export supports MODEL.META_ARCHITECTURE 'SOLO' / 'SOLOv2' / 'PanopticSOLO'"
                )
        args = dict(model.inference_args)
        if args["nms_type"] != "matrix":
            raise ValueError(
                f"MODEL.SOLO.NMS_TYPE={args['nms_type']!r} cannot be exported: only 'matrix' is "
                "(greedy mask NMS is a data-dependent sequential loop)"
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be None or >= 1, got {batch_size}")
        unexported = getattr(model, "unexported_outputs", ())
        if unexported:
            logger.warning(
                f"Exporting the instances of a {type(model).__name__} model: its outputs "
                f"{', '.join(unexported)} are not part of the exported graph"
            )
        self.model = model
        self.batch_size = batch_size
        self.soft_masks = soft_masks
        self.size_divisibility = max(model.backbone.size_divisibility, 1)
        self.postprocess_args = args

    def _image_detections(
        self, cate: Tensor, soft_masks, canvas_hw: Tuple[int, int], image_hw: Tuple[int, int]
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The post-processing core, then the masks upsampled to the padded canvas and cropped
        to the image (the output size is the input size); also the soft masks."""
        scores, classes, soft = select_detections(
            cate, soft_masks, self.model.cell_strides, **self.postprocess_args
        )
        # masks along the batch axis: upsampling accepts an empty batch, not empty channels
        h, w = image_hw
        upsampled = F.interpolate(soft[:, None], size=canvas_hw, mode="bilinear")
        threshold = self.postprocess_args["mask_threshold"]
        return scores, classes, upsampled[:, 0, :h, :w] > threshold, soft

    @property
    def output_names(self) -> List[str]:
        names = ["scores", "classes", "masks"]
        names += [] if self.batch_size is None else ["image_index"]
        return names + (["soft_masks"] if self.soft_masks else [])

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        images = image.unsqueeze(0) if self.batch_size is None else image
        h, w = images.shape[-2:]
        x = (images - self.model.pixel_mean) / self.model.pixel_std
        div = self.size_divisibility
        x = F.pad(x, (0, (-w) % div, 0, (-h) % div))  # as ImageList.from_tensors, pad value 0
        canvas_hw = x.shape[-2:]
        cate, soft_masks = self.model.read_cells(self.model.predict(x), canvas_hw)
        outputs = [
            self._image_detections(cate[i], soft_masks[i], canvas_hw, (h, w))
            for i in range(self.batch_size or 1)  # fixed when exported
        ]
        soft = [torch.cat([o[3] for o in outputs])] if self.soft_masks else []
        if self.batch_size is None:
            return (*outputs[0][:3], *soft)
        scores, classes, masks = (torch.cat(t) for t in list(zip(*outputs))[:3])
        image_index = torch.cat(
            [torch.full_like(o[0], i, dtype=torch.int64) for i, o in enumerate(outputs)]
        )
        return (scores, classes, masks, image_index, *soft)
