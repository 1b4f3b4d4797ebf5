"""Panoptic segmentation with the SOLO family (SOLOv2 paper, Sec. 5.3): :class:`PanopticSOLO`,
the instance model extended with a stuff branch and the merge of things and stuff.

Design (the paper gives only its outline; its code was never released):

* **things** are the model's instances, from any head variant, through the usual inference;
* **stuff** comes from :class:`SOLOStuffHead`, analogous to SOLOv2's mask-feature branch: FPN
  P2-P5 fused to 1/4 scale by the same conv / upsample towers as :class:`~.heads.SOLOv2MaskHead`
  (the same module class, with its own weights, so it exists for every variant, with or without
  a mask-feature branch), then a 1x1 per-pixel classifier over ``NUM_STUFF_CLASSES + 1`` classes,
  class 0 being "things" (as detectron2's Panoptic FPN). Its loss ``loss_sem_seg`` is the pixel
  cross-entropy at input resolution, void pixels ignored;
* the two are merged with Panoptic FPN's heuristic (Kirillov et al., "Panoptic Feature Pyramid
  Networks", CVPR 2019), :func:`combine_things_and_stuff`.

Shape shorthand: B images, K stuff classes (+1 for "things"), Hc, Wc the padded batch canvas,
H, W an output image, N instances.
"""

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList, Instances
from torch import Tensor, nn

from .heads import SOLOv2MaskHead
from .meta_arch import SOLO, _check_features

__all__ = [
    "PanopticSOLO",
    "SOLOStuffHead",
    "combine_things_and_stuff",
    "is_panoptic",
    "semantic_loss",
]


def semantic_loss(logits: Tensor, targets: Tensor, ignore_label: int) -> Tensor:
    """Mean pixel cross-entropy over the labelled pixels (0 when none is labelled).

    Args:
        logits: (B, K + 1, h, w) at a stride of the canvas; upsampled bilinearly to the targets.
        targets: (B, Hc, Wc) int64 class per pixel, ``ignore_label`` for void and padding.
    """
    logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits, targets, ignore_index=ignore_label, reduction="sum")
    return total / (targets != ignore_label).sum().clamp(min=1)


class SOLOStuffHead(nn.Module):
    """The stuff (semantic) branch: fused FPN features at 1/4 scale, per-pixel classifier."""

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_levels: int,
        channels: int,
        num_stuff_classes: int,
        norm: str,
        ignore_label: int = 255,
    ):
        """
        Args:
            in_channels: channels of every input feature (FPN: 256).
            num_levels: input features (P2-P5: 4), fused to the stride of the first.
            channels: width of the fusion towers and of their output.
            num_stuff_classes: K; the classifier predicts K + 1 classes, 0 being "things".
            norm: norm of the fusion convs ("GN" or "").
            ignore_label: target value of pixels without a label (void, padding).
        """
        super().__init__()
        self.fuse = SOLOv2MaskHead(
            in_channels=in_channels,
            num_levels=num_levels,
            channels=channels,
            num_kernels=channels,
            norm=norm,
        )
        self.predictor = nn.Conv2d(channels, num_stuff_classes + 1, 1)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.constant_(self.predictor.bias, 0)
        self.num_stuff_classes = num_stuff_classes
        self.ignore_label = ignore_label

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        pc = cfg.MODEL.SOLO.PANOPTIC
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(
                f"MODEL.SOLO.PANOPTIC.IN_FEATURES {pc.IN_FEATURES} must have equal channels, got "
                f"{[s.channels for s in input_shape]}"
            )
        return {
            "in_channels": channels.pop(),
            "num_levels": len(pc.IN_FEATURES),
            "channels": pc.CHANNELS,
            "num_stuff_classes": pc.NUM_STUFF_CLASSES,
            "norm": cfg.MODEL.SOLO.NORM,
        }

    def forward(self, features: List[Tensor]) -> Tensor:
        """
        Args:
            features: maps (B, C, H_l, W_l), each level at half the resolution of the previous.
        Returns:
            (B, K + 1, H_0, W_0) logits at the first feature's stride.
        """
        return self.predictor(self.fuse(features))

    def losses(self, logits: Tensor, targets: Tensor) -> Tensor:
        """:func:`semantic_loss` of ``forward``'s logits against (B, Hc, Wc) targets."""
        return semantic_loss(logits, targets, self.ignore_label)

    @staticmethod
    def postprocess(
        logits: Tensor, canvas_hw: Tuple[int, int], image_hw: Tuple[int, int], output_hw
    ) -> Tensor:
        """One image's logits (K + 1, h, w) -> (K + 1, H, W) at the output size: upsampled to
        the padded canvas, cropped to the image, resized (detectron2's ``sem_seg_postprocess``)."""
        up = F.interpolate(logits[None], size=canvas_hw, mode="bilinear", align_corners=False)
        return sem_seg_postprocess(up[0], image_hw, *output_hw)


def combine_things_and_stuff(
    instances: Instances,
    stuff_labels: Tensor,
    *,
    overlap_threshold: float,
    stuff_area_limit: int,
    score_threshold: float,
) -> Tuple[Tensor, List[Dict]]:
    """Panoptic FPN's merge heuristic, in detectron2's ``panoptic_seg`` convention.

    1. Instances are taken by descending score while the score is >= ``score_threshold``; one
       whose mask is empty, or whose pixels already taken are more than ``overlap_threshold`` of
       its mask, is dropped; otherwise its untaken pixels become a segment. This is greedy: each
       decision depends on the instances kept before it, so instances are visited in turn.
    2. Every stuff class (label >= 1 of ``stuff_labels``; 0 is "things") takes its pixels that
       no instance took, when they are at least ``stuff_area_limit``.

    Args:
        instances: one image's Instances with pred_masks (N, H, W) bool, scores, pred_classes.
        stuff_labels: (H, W) int64 stuff class per pixel (argmax of the stuff branch).
    Returns:
        seg: (H, W) int32 segment ids, 0 for pixels of no segment.
        segments_info: per segment, ``{"id", "isthing", "category_id", "area"}`` plus, for
            things, ``"score"`` and ``"instance_id"`` (index into ``instances``); things first,
            by descending score, then stuff by class.
    """
    device = stuff_labels.device
    seg = torch.zeros(stuff_labels.shape, dtype=torch.int32, device=device)
    taken = torch.zeros(stuff_labels.shape, dtype=torch.bool, device=device)
    segments = []
    scores = instances.scores
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[scores[order] >= score_threshold]
    if len(order):
        masks = instances.pred_masks[order].to(device=device, dtype=torch.bool)
        areas = masks.flatten(1).sum(1).tolist()
        classes = instances.pred_classes[order].tolist()
        kept_scores = scores[order].tolist()
        for k, inst in enumerate(order.tolist()):
            if areas[k] == 0:
                continue
            mask = masks[k]
            overlap = int((mask & taken).sum())
            if overlap / areas[k] > overlap_threshold:
                continue
            visible = mask & ~taken
            taken |= visible
            segment_id = len(segments) + 1
            seg[visible] = segment_id
            segments.append(
                {
                    "id": segment_id,
                    "isthing": True,
                    "category_id": classes[k],
                    "score": kept_scores[k],
                    "instance_id": inst,
                    "area": areas[k] - overlap,
                }
            )
    free = ~taken
    num_labels = int(stuff_labels.max()) + 1 if stuff_labels.numel() else 1
    counts = torch.bincount(stuff_labels[free], minlength=num_labels)
    counts[0] = 0  # the "things" class never becomes a stuff segment
    labels = (counts >= max(stuff_area_limit, 1)).nonzero()[:, 0]
    if len(labels):
        first = len(segments) + 1
        ids = torch.zeros(num_labels, dtype=torch.int32, device=device)
        ids[labels] = torch.arange(first, first + len(labels), dtype=torch.int32, device=device)
        stuff_ids = ids[stuff_labels]
        seg = torch.where(free & (stuff_ids > 0), stuff_ids, seg)
        for i, (label, area) in enumerate(zip(labels.tolist(), counts[labels].tolist())):
            segments.append({"id": first + i, "isthing": False, "category_id": label, "area": area})
    return seg, segments


@META_ARCH_REGISTRY.register()
class PanopticSOLO(SOLO):
    """A SOLO-family instance model (any head variant) plus a stuff branch: panoptic segmentation.

    Training inputs also need "sem_seg", the (H, W) int64 semantic target (stuff ids 1..K,
    things 0, void ``ignore_label``) of :class:`solo_d2.data.SOLOPanopticDatasetMapper`; the losses
    add ``loss_sem_seg``. Eval-mode outputs add, per image, "sem_seg" ((K + 1, H, W) stuff logits,
    class 0 = things) and "panoptic_seg" ((H, W) int32 segment ids, segments_info) in
    detectron2's convention: a thing segment's category_id is a thing class, a stuff segment's a
    stuff class 1..K. Export (``solo_d2.export``) gives the instances only.
    """

    unexported_outputs = ("sem_seg", "panoptic_seg")

    @configurable
    def __init__(
        self,
        *,
        stuff_head: SOLOStuffHead,
        stuff_in_features: List[str],
        stuff_loss_weight: float = 0.5,
        overlap_threshold: float = 0.5,
        stuff_area_limit: int = 4096,
        instances_score_threshold: float = 0.2,
        **kwargs,
    ):
        """
        Args:
            stuff_head: the stuff branch.
            stuff_in_features: backbone feature names of the stuff branch.
            stuff_loss_weight: weight of loss_sem_seg.
            overlap_threshold, stuff_area_limit, instances_score_threshold: the merge, see
                :func:`combine_things_and_stuff` (its overlap_threshold, stuff_area_limit and
                score_threshold).
            kwargs: as :class:`~.meta_arch.SOLO`.
        """
        super().__init__(**kwargs)
        self.stuff_head = stuff_head
        self.apply_memory_format()  # the layout SOLO gave its own modules
        self.stuff_in_features = list(stuff_in_features)
        self.stuff_loss_weight = stuff_loss_weight
        self.panoptic_args = dict(
            overlap_threshold=overlap_threshold,
            stuff_area_limit=stuff_area_limit,
            score_threshold=instances_score_threshold,
        )

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        pc = cfg.MODEL.SOLO.PANOPTIC
        shapes = ret["backbone"].output_shape()
        features = _check_features(pc, shapes, "", "MODEL.SOLO.PANOPTIC.")
        ret.update(
            stuff_head=SOLOStuffHead(cfg, [shapes[f] for f in features]),
            stuff_in_features=features,
            stuff_loss_weight=pc.LOSS_WEIGHT,
            overlap_threshold=pc.OVERLAP_THRESH,
            stuff_area_limit=pc.STUFF_AREA_LIMIT,
            instances_score_threshold=pc.INSTANCES_CONFIDENCE_THRESH,
        )
        return ret

    def losses(
        self, images: ImageList, features: Dict[str, Tensor], batched_inputs: List[Dict]
    ) -> Dict[str, Tensor]:
        """The instance losses and ``loss_sem_seg``."""
        losses = super().losses(images, features, batched_inputs)
        logits = self.stuff_head([features[f] for f in self.stuff_in_features])
        targets = self._semantic_targets(batched_inputs, tuple(images.tensor.shape[-2:]))
        losses["loss_sem_seg"] = self.stuff_loss_weight * self.stuff_head.losses(logits, targets)
        return losses

    def _semantic_targets(self, batched_inputs: List[Dict], canvas_hw: Tuple[int, int]) -> Tensor:
        """(B, Hc, Wc) int64 "sem_seg" targets padded with the ignore label to the canvas."""
        if any("sem_seg" not in x for x in batched_inputs):
            raise ValueError(
                f"{type(self).__name__} trains on panoptic data: every input needs 'sem_seg' "
                "(register the data with --dataset "
                "NAME=panoptic:PANOPTIC.json:PANOPTIC_PNG_DIR:IMAGE_DIR and use "
                "SOLOPanopticDatasetMapper)"
            )
        ignore = self.stuff_head.ignore_label
        out = torch.full(
            (len(batched_inputs), *canvas_hw), ignore, dtype=torch.int64, device=self.device
        )
        for i, x in enumerate(batched_inputs):
            target = x["sem_seg"].to(self.device)
            out[i, : target.shape[0], : target.shape[1]] = target
        return out

    def inference_outputs(
        self, images: ImageList, features: Dict[str, Tensor], batched_inputs: List[Dict]
    ) -> List[Dict]:
        """The instances, then per image "sem_seg" and "panoptic_seg" (the class docstring)."""
        results = super().inference_outputs(images, features, batched_inputs)
        logits = self.stuff_head([features[f] for f in self.stuff_in_features])
        canvas_hw = tuple(images.tensor.shape[-2:])
        for b, r in enumerate(results):
            sem_seg = self.stuff_head.postprocess(
                logits[b], canvas_hw, tuple(images.image_sizes[b]), r["instances"].image_size
            )
            r["sem_seg"] = sem_seg
            r["panoptic_seg"] = combine_things_and_stuff(
                r["instances"], sem_seg.argmax(0), **self.panoptic_args
            )
        return results


def is_panoptic(cfg: CfgNode) -> bool:
    """Whether the model of ``cfg`` is a panoptic one: its ``MODEL.META_ARCHITECTURE`` is
    :class:`PanopticSOLO` or a subclass. The one question every entry point asks (preflight,
    the Trainer's mapper and evaluator)."""
    try:
        arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    except KeyError:
        return False
    return isinstance(arch, type) and issubclass(arch, PanopticSOLO)
