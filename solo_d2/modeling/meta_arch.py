"""The SOLO-family META_ARCH: backbone + instance head (+ SOLOv2's mask-feature branch)
(+ the stuff branch of panoptic models).

One engine for every variant: the same target assignment, losses and post-processing; the
instance head chosen by ``MODEL.SOLO.HEAD`` (heads.SOLO_HEAD_REGISTRY) says how a grid cell's mask
is represented and read, in training, inference and export. With ``MODEL.SOLO.PANOPTIC.ENABLED``
any variant also segments stuff and merges it with its instances (:mod:`.panoptic`).

Shape shorthand:
    B: images    L: instance levels    S_l: grid size    C: classes    E: kernel length
    Hc, Wc: padded batch canvas    Hf, Wf: mask size at the mask stride    P: positive samples
    M: instances of the batch
"""

import copy
import itertools
import logging
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from ..checkpoint.adelaidet import is_adelaidet_solov2_state_dict
from .backbone import fold_frozen_batchnorm
from .heads import (
    SoftMasks,
    SOLOHead,
    SOLOv2MaskHead,
    build_solo_head,
    mask_target_strides,
    split_instance_features,
)
from .losses import category_loss, dice_loss
from .panoptic import SOLOStuffHead, combine_things_and_stuff
from .postprocessing import category_scores, cell_strides, solo_postprocess
from .targets import assign_grid_targets, mask_target_field

__all__ = ["SOLO", "SOLOv2", "HeadOutputs"]

# predict()'s outputs: per level (B, C, S_l, S_l) category logits, per level the head's mask
# predictions, and (B, E, Hf, Wf) mask features (None for heads that use none)
HeadOutputs = Tuple[List[Tensor], List[Tensor], Optional[Tensor]]

logger = logging.getLogger(__name__)


def _log_checkpoint_layout(module, state_dict, prefix, *args):
    if prefix == "" and is_adelaidet_solov2_state_dict(state_dict):
        heads = sum(k.startswith(("ins_head.", "mask_head.")) for k in state_dict)
        logger.info(
            f"Recognised AdelaiDet's SOLOv2 checkpoint layout ({heads} head tensors, "
            f"{sum(k.startswith('backbone.') for k in state_dict)} backbone tensors): "
            "its key names are this model's, loading without renaming."
        )


@META_ARCH_REGISTRY.register()
class SOLO(nn.Module):
    """SOLO (Wang et al., ECCV 2020), Decoupled SOLO and SOLOv2 (NeurIPS 2020), light variants.

    Input: detectron2's list of dicts with "image" (C, H, W) and, in training, "instances" made by
    :class:`solo_d2.data.SOLODatasetMapper` (gt_classes, gt_boxes, gt_centers, gt_masks_small and,
    for heads predicting masks at several strides, gt_masks_small_s{stride}).
    Output in eval mode: ``[{"instances": Instances}]`` at the requested ("height", "width") size
    with bool pred_masks, pred_boxes (from the masks), scores and int64 pred_classes.

    Panoptic models (a ``stuff_head``) also take "sem_seg" (H, W) int64 targets in training (see
    SOLODatasetMapper) and return, per image, "sem_seg" ((K + 1, H, W) stuff logits, class 0 =
    things) and "panoptic_seg" ((H, W) int32 segment ids, segments_info), detectron2's
    convention: thing segments' category_id is a thing class, stuff segments' a stuff class
    1..K.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        ins_head: SOLOHead,
        mask_head: Optional[SOLOv2MaskHead],
        instance_in_features: List[str],
        mask_in_features: List[str],
        instance_strides: List[int],
        scale_ranges: List[Tuple[float, float]],
        sigma: float,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
        mask_strides: List[int],
        # Loss parameters:
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        focal_weight: float = 1.0,
        dice_weight: float = 3.0,
        # Inference parameters:
        score_threshold: float = 0.1,
        mask_threshold: float = 0.5,
        nms_pre: int = 500,
        update_threshold: float = 0.05,
        nms_type: str = "matrix",
        nms_kernel: str = "gaussian",
        nms_sigma: float = 2.0,
        max_per_image: int = 100,
        chunk_size: int = 256,
        channels_last: bool = False,
        fold_frozen_bn: bool = True,
        # Panoptic segmentation:
        stuff_head: Optional[SOLOStuffHead] = None,
        stuff_in_features: Tuple[str, ...] = (),
        stuff_loss_weight: float = 0.5,
        panoptic_overlap_threshold: float = 0.5,
        panoptic_stuff_area_limit: int = 4096,
        panoptic_score_threshold: float = 0.5,
    ):
        """
        Args:
            backbone: a Backbone producing ``instance_in_features`` and ``mask_in_features``.
            ins_head: the variant's instance head.
            mask_head: SOLOv2's mask-feature branch, or None for heads that need none.
            instance_in_features, mask_in_features: backbone feature names of each branch.
            instance_strides: effective stride of each (split) instance level.
            scale_ranges: (lo, hi) of sqrt(box area) per level.
            sigma: centre-region scale.
            pixel_mean, pixel_std: input normalisation.
            mask_strides: stride of each level's mask prediction (``heads.mask_target_strides``).

            # Loss parameters:
            focal_alpha, focal_gamma, focal_weight: category focal loss.
            dice_weight: weight of the dice mask loss.

            # Inference parameters:
            score_threshold, mask_threshold, nms_pre, update_threshold, nms_type, nms_kernel,
            nms_sigma, max_per_image, chunk_size: see :func:`solo_postprocess`.

            channels_last: store the 4-D weights channels-last (NHWC): same results up to float
                rounding, faster convolutions on CPU. ``.to(device)`` and checkpoint loading keep
                the layout.
            fold_frozen_bn: at inference (eval mode, no autograd), run the backbone through a
                copy whose FrozenBatchNorm layers are folded into the preceding convs
                (:meth:`inference_backbone`): same results up to float rounding, faster.

            # Panoptic segmentation (all unused without a stuff_head):
            stuff_head: the stuff branch, or None for an instance segmentation model.
            stuff_in_features: backbone feature names of the stuff branch.
            stuff_loss_weight: weight of loss_sem_seg.
            panoptic_overlap_threshold, panoptic_stuff_area_limit, panoptic_score_threshold:
                the merge, see :func:`~.panoptic.combine_things_and_stuff`.
        """
        super().__init__()
        self.backbone = backbone
        self.ins_head = ins_head
        self.mask_head = mask_head
        if ins_head.uses_mask_features and mask_head is None:
            raise ValueError(f"{type(ins_head).__name__} needs a mask-feature branch (mask_head)")
        self.instance_in_features = instance_in_features
        self.mask_in_features = mask_in_features
        self.instance_strides = list(instance_strides)
        self.scale_ranges = [tuple(r) for r in scale_ranges]
        self.sigma = sigma
        self.mask_strides = list(mask_strides)
        # stride of the soft masks at inference, and of the gt_masks_small field
        self.mask_stride = min(self.mask_strides)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.focal_weight, self.dice_weight = focal_weight, dice_weight
        self.inference_args = dict(
            score_threshold=score_threshold,
            mask_threshold=mask_threshold,
            nms_pre=nms_pre,
            update_threshold=update_threshold,
            nms_type=nms_type,
            nms_kernel=nms_kernel,
            nms_sigma=nms_sigma,
            max_per_image=max_per_image,
            chunk_size=chunk_size,
        )
        self.stuff_head = stuff_head
        self.stuff_in_features = list(stuff_in_features)
        self.stuff_loss_weight = stuff_loss_weight
        self.panoptic_args = dict(
            overlap_threshold=panoptic_overlap_threshold,
            stuff_area_limit=panoptic_stuff_area_limit,
            score_threshold=panoptic_score_threshold,
        )
        self.register_load_state_dict_pre_hook(_log_checkpoint_layout)
        if nms_type not in ("matrix", "mask"):
            raise ValueError(f"MODEL.SOLO.NMS_TYPE must be 'matrix' or 'mask', got {nms_type!r}")
        if nms_kernel not in ("gaussian", "linear"):
            raise ValueError(f"MODEL.SOLO.NMS_KERNEL must be 'gaussian'/'linear': {nms_kernel!r}")
        n = len(ins_head.num_grids)
        if not (
            len(instance_in_features)
            == len(instance_strides)
            == len(scale_ranges)
            == len(self.mask_strides)
            == n
        ):
            raise ValueError(
                "MODEL.SOLO.INSTANCE_IN_FEATURES, FPN_INSTANCE_STRIDES, FPN_SCALE_RANGES and "
                f"NUM_GRIDS must have the same length, got {len(instance_in_features)}, "
                f"{len(instance_strides)}, {len(scale_ranges)} and {n}"
            )
        # instance stride of every grid cell's level: the area filter at inference
        self.register_buffer(
            "cell_strides", cell_strides(ins_head.num_grids, instance_strides), False
        )
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.fold_frozen_bn = fold_frozen_bn
        # (folded copy of the backbone, the state of the backbone it was made from); a list, so
        # that the copy is not a submodule: not in state_dict(), parameters() or .to()
        self._folded_backbone: list = []

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        sc = cfg.MODEL.SOLO
        ins_head = build_solo_head(
            cfg, [shapes[f] for f in _check_features(sc, shapes, "INSTANCE")]
        )
        mask_head = None
        if ins_head.uses_mask_features:
            mask_feats = _check_features(sc, shapes, "MASK")
            mask_head = SOLOv2MaskHead(cfg, [shapes[f] for f in mask_feats])
            if shapes[mask_feats[0]].stride != mask_target_strides(cfg)[0]:
                raise ValueError(
                    f"MODEL.SOLO.MASK_IN_FEATURES[0]={mask_feats[0]!r} has stride "
                    f"{shapes[mask_feats[0]].stride}, not the one its name implies"
                )
        pc = sc.PANOPTIC
        stuff_head = None
        if pc.ENABLED:
            stuff_features = _check_features(pc, shapes, "", "MODEL.SOLO.PANOPTIC.")
            stuff_head = SOLOStuffHead(cfg, [shapes[f] for f in stuff_features])
        return {
            "backbone": backbone,
            "ins_head": ins_head,
            "mask_head": mask_head,
            "stuff_head": stuff_head,
            "stuff_in_features": pc.IN_FEATURES,
            "stuff_loss_weight": pc.LOSS_WEIGHT,
            "panoptic_overlap_threshold": pc.OVERLAP_THRESH,
            "panoptic_stuff_area_limit": pc.STUFF_AREA_LIMIT,
            "panoptic_score_threshold": pc.INSTANCES_CONFIDENCE_THRESH,
            "instance_in_features": sc.INSTANCE_IN_FEATURES,
            "mask_in_features": sc.MASK_IN_FEATURES,
            "instance_strides": sc.FPN_INSTANCE_STRIDES,
            "scale_ranges": sc.FPN_SCALE_RANGES,
            "sigma": sc.SIGMA,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "mask_strides": mask_target_strides(cfg),
            "focal_alpha": sc.LOSS.FOCAL_ALPHA,
            "focal_gamma": sc.LOSS.FOCAL_GAMMA,
            "focal_weight": sc.LOSS.FOCAL_WEIGHT,
            "dice_weight": sc.LOSS.DICE_WEIGHT,
            "score_threshold": sc.SCORE_THRESH_TEST,
            "mask_threshold": sc.MASK_THRESH_TEST,
            "nms_pre": sc.NMS_PRE_TOPK,
            "update_threshold": sc.UPDATE_THRESH_TEST,
            "nms_type": sc.NMS_TYPE,
            "nms_kernel": sc.NMS_KERNEL,
            "nms_sigma": sc.NMS_SIGMA,
            "max_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "chunk_size": sc.INFERENCE_CHUNK_SIZE,
            "channels_last": sc.CHANNELS_LAST,
            "fold_frozen_bn": sc.FOLD_FROZEN_BN,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def predict(self, images: Tensor) -> HeadOutputs:
        """Head outputs for a padded batch.

        Args:
            images: (B, 3, Hc, Wc) normalised, padded to the backbone's size divisibility.
        Returns:
            cate_logits: L tensors (B, C, S_l, S_l).
            mask_preds: L tensors, the head's mask predictions (SOLOv2: kernels (B, E, S_l, S_l)).
            mask_feat: (B, E, Hf, Wf) SOLOv2 mask features, None for the other heads.
        """
        return self._predict(self._features(images))

    def _features(self, images: Tensor) -> Dict[str, Tensor]:
        """Backbone features: through :meth:`inference_backbone` in eval mode without autograd
        (where gradients may be needed, and when traced for export, through the backbone)."""
        if self.training or torch.is_grad_enabled() or torch.jit.is_tracing():
            return self.backbone(images)  # export: ONNX Runtime folds the norms itself
        return self.inference_backbone()(images)

    def inference_backbone(self) -> nn.Module:
        """The backbone to run inference with: with ``fold_frozen_bn``, a copy with its
        FrozenBatchNorm layers folded into their convs (:func:`~.backbone.fold_frozen_batchnorm`),
        made again whenever a backbone tensor changed (training step, checkpoint loading, device
        or dtype change); else the backbone itself.

        The copy holds a second set of backbone weights (R50-FPN: about 110 MB); a backbone
        without FrozenBatchNorm is used as it is.
        """
        if not self.fold_frozen_bn:
            return self.backbone
        tensors = itertools.chain(self.backbone.parameters(), self.backbone.buffers())
        try:
            state = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
        except RuntimeError:  # inference tensors (made under torch.inference_mode) have no version
            return self.backbone
        if not self._folded_backbone or self._folded_backbone[1] != state:
            self._folded_backbone.clear()  # free the old copy before making the new one
            folded = copy.deepcopy(self.backbone).eval().requires_grad_(False)
            if fold_frozen_batchnorm(folded) == 0:  # no FrozenBN (e.g. BN, GN): no second copy
                folded = self.backbone
            self._folded_backbone[:] = [folded, state]
        return self._folded_backbone[0]

    def _predict(self, features: Dict[str, Tensor]) -> HeadOutputs:
        """:meth:`predict` from the backbone's features."""
        ins_feats = split_instance_features([features[f] for f in self.instance_in_features])
        cate_logits, mask_preds = self.ins_head(ins_feats)
        mask_feat = None
        if self.mask_head is not None:
            mask_feat = self.mask_head([features[f] for f in self.mask_in_features])
        return cate_logits, mask_preds, mask_feat

    def read_cells(
        self, outputs: HeadOutputs, canvas_hw: Tuple[int, int]
    ) -> Tuple[Tensor, List[SoftMasks]]:
        """Category scores of every grid cell and each image's mask reading: the common start of
        eager post-processing (:meth:`postprocess`) and of export (``SOLOExportable``).

        Args:
            outputs: :meth:`predict`'s outputs for a padded batch.
            canvas_hw: (Hc, Wc) size of the padded batch.
        Returns:
            cate: (B, G, C) probabilities after points NMS, levels concatenated, cells row-major.
            soft_masks: per image, f(cells) -> (n, Hc / mask_stride, Wc / mask_stride) soft
                masks (the head's ``soft_mask_fn``).
        """
        cate_logits, mask_preds, mask_feat = outputs
        out_hw = (canvas_hw[0] // self.mask_stride, canvas_hw[1] // self.mask_stride)
        soft_masks = [
            self.ins_head.soft_mask_fn(mask_preds, mask_feat, b, out_hw)
            for b in range(len(cate_logits[0]))
        ]
        return category_scores(cate_logits), soft_masks

    def postprocess(
        self, images: ImageList, outputs: HeadOutputs, batched_inputs: List[Dict]
    ) -> List[Dict[str, Instances]]:
        """Inference after the network, for a batch of one padded size: points NMS, soft masks,
        scoring, Matrix NMS and resizing to each input's ("height", "width").

        Args:
            images: the preprocessed batch (:meth:`preprocess_image`).
            outputs: :meth:`predict`'s outputs on ``images.tensor``.
            batched_inputs: the inputs, for their "height" and "width".
        Returns:
            per image, ``{"instances": Instances}`` (see the class docstring).
        """
        canvas_hw = tuple(images.tensor.shape[-2:])
        cate, soft_masks = self.read_cells(outputs, canvas_hw)
        results = []
        for b, x in enumerate(batched_inputs):
            image_hw = tuple(images.image_sizes[b])
            output_hw = (x.get("height", image_hw[0]), x.get("width", image_hw[1]))
            r = solo_postprocess(
                cate[b], soft_masks[b], self.cell_strides, canvas_hw, image_hw, output_hw,
                **self.inference_args,
            )  # fmt: skip
            results.append({"instances": r})
        return results

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        if "instances" not in batched_inputs[0]:
            raise ValueError(
                f"{type(self).__name__} training needs 'instances' in every input "
                "(use SOLODatasetMapper)"
            )
        gt = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        cate_logits, mask_preds, mask_feat = self._predict(features)
        canvas_hw = tuple(images.tensor.shape[-2:])
        losses = self.losses(cate_logits, mask_preds, mask_feat, gt, canvas_hw)
        if self.stuff_head is not None:
            losses["loss_sem_seg"] = self.stuff_loss_weight * self.stuff_head.losses(
                self.stuff_head([features[f] for f in self.stuff_in_features]),
                self._semantic_targets(batched_inputs, canvas_hw),
            )
        return losses

    def _semantic_targets(self, batched_inputs: List[Dict], canvas_hw: Tuple[int, int]) -> Tensor:
        """(B, Hc, Wc) int64 "sem_seg" targets padded with the ignore label to the canvas."""
        if any("sem_seg" not in x for x in batched_inputs):
            raise ValueError(
                f"{type(self).__name__} with MODEL.SOLO.PANOPTIC.ENABLED trains on panoptic data: "
                "every input needs 'sem_seg' (register the data with --dataset "
                "NAME=panoptic:PANOPTIC.json:PANOPTIC_PNG_DIR:IMAGE_DIR and use SOLODatasetMapper)"
            )
        ignore = self.stuff_head.ignore_label
        out = torch.full(
            (len(batched_inputs), *canvas_hw), ignore, dtype=torch.int64, device=self.device
        )
        for i, x in enumerate(batched_inputs):
            target = x["sem_seg"].to(self.device)
            out[i, : target.shape[0], : target.shape[1]] = target
        return out

    def assign_targets(
        self, gt: List[Instances], canvas_hw: Tuple[int, int]
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """Grid targets of a batch on its padded canvas (see :func:`assign_grid_targets`).

        Args:
            gt: per image, Instances with gt_classes (N,), gt_boxes and gt_centers (N, 2).
            canvas_hw: (Hc, Wc) padded batch size.
        Returns:
            (cate_labels per level (B, S, S), positives per level (P, 3) [image, cell, instance]).
        """
        device = self.device
        image_ids = torch.cat(
            [torch.full((len(g),), i, dtype=torch.int64, device=device) for i, g in enumerate(gt)]
        )
        return assign_grid_targets(
            boxes=torch.cat([g.gt_boxes.tensor for g in gt]),
            centers=torch.cat([g.gt_centers for g in gt]),
            labels=torch.cat([g.gt_classes for g in gt]),
            image_ids=image_ids,
            num_images=len(gt),
            canvas_hw=canvas_hw,
            num_grids=self.ins_head.num_grids,
            scale_ranges=self.scale_ranges,
            sigma=self.sigma,
            num_classes=self.ins_head.num_classes,
            # SOLOv2 trains a shared cell with every covering instance; the other heads' dense
            # per-cell targets keep the last one (as WXinlong/SOLO's solo_head.py)
            last_instance_wins=not self.ins_head.uses_mask_features,
        )

    def losses(
        self,
        cate_logits: List[Tensor],
        mask_preds: List[Tensor],
        mask_feat: Optional[Tensor],
        gt: List[Instances],
        canvas_hw: Optional[Tuple[int, int]] = None,
    ) -> Dict[str, Tensor]:
        """Assign grid targets on the padded canvas, then focal + dice losses.

        Args:
            cate_logits, mask_preds, mask_feat: outputs of :meth:`predict`.
            gt: per image, Instances with gt_classes (N,), gt_boxes, gt_centers (N, 2) and the
                masks rescaled to each mask stride (gt_masks_small, gt_masks_small_s{stride}).
            canvas_hw: (Hc, Wc) padded batch size; by default the mask features' size times
                their stride.
        Returns:
            {"loss_cls", "loss_mask"}.
        """
        num_images = len(gt)
        if canvas_hw is None:
            hf, wf = mask_feat.shape[-2:]
            canvas_hw = (hf * self.mask_stride, wf * self.mask_stride)
        cate_labels, positives = self.assign_targets(gt, canvas_hw)
        loss_cls = self.focal_weight * category_loss(
            cate_logits, cate_labels, alpha=self.focal_alpha, gamma=self.focal_gamma
        )

        num_pos = sum(len(p) for p in positives)
        storage = get_event_storage()
        storage.put_scalar("solo/num_pos_samples", num_pos / num_images)
        storage.put_scalar(
            "solo/num_pos_cells",
            sum(int((c != self.ins_head.num_classes).sum()) for c in cate_labels) / num_images,
        )
        if num_pos == 0:
            # keep every output in the graph so DDP sees gradients for all parameters
            zero = sum(p.sum() for p in mask_preds) * 0
            if mask_feat is not None:
                zero = zero + mask_feat.sum() * 0
            return {"loss_cls": loss_cls, "loss_mask": zero}

        targets = {}  # stride -> (M, Hc/stride, Wc/stride) uint8 canvas of every instance
        dice = []
        unused = 0.0  # levels without positives stay in the graph (DDP needs every gradient)
        for level, (pred, pos) in enumerate(zip(mask_preds, positives)):
            if len(pos) == 0:
                unused = unused + pred.sum() * 0
                continue
            probs = self.ins_head.positive_masks(pred, mask_feat, pos[:, 0], pos[:, 1])
            stride = self.mask_strides[level]
            if stride not in targets:
                targets[stride] = self._mask_targets(gt, stride, canvas_hw, sum(len(g) for g in gt))
            target = targets[stride][pos[:, 2]]
            if target.shape[-2:] != probs.shape[-2:]:
                raise ValueError(
                    f"level {level}: masks predicted at {tuple(probs.shape[-2:])} but the canvas "
                    f"{canvas_hw} at stride {stride} is {tuple(target.shape[-2:])}; check "
                    "MODEL.SOLO.FPN_INSTANCE_STRIDES against the backbone features"
                )
            dice.append(dice_loss(probs.flatten(1), target.flatten(1)))
        loss_mask = self.dice_weight * torch.cat(dice).mean() + unused
        return {"loss_cls": loss_cls, "loss_mask": loss_mask}

    def _mask_targets(
        self, gt: List[Instances], stride: int, canvas_hw: Tuple[int, int], num_instances: int
    ) -> Tensor:
        """Each image's masks at ``stride``, pasted top-left into the batch canvas at that stride.

        Returns:
            (M, Hc / stride, Wc / stride) uint8.
        """
        field = mask_target_field(stride, self.mask_stride)
        out = torch.zeros(
            (num_instances, canvas_hw[0] // stride, canvas_hw[1] // stride),
            dtype=torch.uint8,
            device=self.device,
        )
        offset = 0
        for g in gt:
            if len(g) and not g.has(field):
                raise ValueError(
                    f"training instances lack the field {field!r}: {type(self.ins_head).__name__} "
                    f"predicts masks at strides {sorted(set(self.mask_strides))}; build the inputs "
                    "with SOLODatasetMapper (it adds one field per stride)"
                )
            if len(g):
                small = g.get(field)
                out[offset : offset + len(g), : small.shape[1], : small.shape[2]] = small
            offset += len(g)
        return out

    def inference(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        """Run images with the same padded size together, so batching never changes a result.

        SOLO's grid cells and coordinates are relative to the padded canvas, so an image padded
        to a larger batch canvas would get different predictions than alone.
        """
        div = max(self.backbone.size_divisibility, 1)
        groups = defaultdict(list)
        for i, x in enumerate(batched_inputs):
            h, w = x["image"].shape[-2:]
            groups[(-(-h // div), -(-w // div))].append(i)
        results = [None] * len(batched_inputs)
        for idx in groups.values():
            for i, r in zip(idx, self._inference_same_size([batched_inputs[i] for i in idx])):
                results[i] = r
        return results

    def _inference_same_size(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        images = self.preprocess_image(batched_inputs)
        features = self._features(images.tensor)
        results = self.postprocess(images, self._predict(features), batched_inputs)
        if self.stuff_head is not None:
            logits = self.stuff_head([features[f] for f in self.stuff_in_features])
            canvas_hw = tuple(images.tensor.shape[-2:])
            for b, r in enumerate(results):
                output_hw = r["instances"].image_size
                sem_seg = self.stuff_head.postprocess(
                    logits[b], canvas_hw, tuple(images.image_sizes[b]), output_hw
                )
                r["sem_seg"] = sem_seg
                r["panoptic_seg"] = combine_things_and_stuff(
                    r["instances"], sem_seg.argmax(0), **self.panoptic_args
                )
        return results


@META_ARCH_REGISTRY.register()
class SOLOv2(SOLO):
    """The META_ARCH name configs used before the family was generalised: the same engine as
    :class:`SOLO`, its head also chosen by ``MODEL.SOLO.HEAD`` (SOLOv2's by default)."""


def _check_features(sc, shapes, branch: str, prefix: str = "MODEL.SOLO.") -> List[str]:
    key = f"{branch}_IN_FEATURES" if branch else "IN_FEATURES"
    missing = [f for f in sc[key] if f not in shapes]
    if missing:
        raise ValueError(
            f"{prefix}{key} names {missing}, not produced by the backbone "
            f"(it produces {sorted(shapes)})"
        )
    return list(sc[key])
