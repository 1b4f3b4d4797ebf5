"""The SOLOv2 META_ARCH: backbone + instance branch + mask-feature branch, training and inference.

Shape shorthand:
    B: images    L: instance levels    S_l: grid size    C: classes    E: kernel length
    Hf, Wf: mask-feature size (stride 4 of the padded batch)    P: positive samples
"""

import logging
from collections import defaultdict
from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from ..adelaidet import is_adelaidet_solov2_state_dict
from .heads import SOLOv2InstanceHead, SOLOv2MaskHead, split_instance_features
from .losses import category_loss, dice_loss
from .postprocessing import point_nms, solov2_postprocess
from .targets import assign_grid_targets

__all__ = ["SOLOv2"]

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
class SOLOv2(nn.Module):
    """SOLOv2 (Wang et al., NeurIPS 2020): dynamic kernels, unified mask features, Matrix NMS.

    Input: detectron2's list of dicts with "image" (C, H, W) and, in training, "instances" made by
    :class:`solo_d2.data.SOLODatasetMapper` (gt_classes, gt_boxes, gt_centers, gt_masks_small).
    Output in eval mode: ``[{"instances": Instances}]`` at the requested ("height", "width") size
    with bool pred_masks, pred_boxes (from the masks), scores and int64 pred_classes.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        ins_head: SOLOv2InstanceHead,
        mask_head: SOLOv2MaskHead,
        instance_in_features: List[str],
        mask_in_features: List[str],
        instance_strides: List[int],
        scale_ranges: List[Tuple[float, float]],
        sigma: float,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
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
    ):
        super().__init__()
        self.backbone = backbone
        self.ins_head = ins_head
        self.mask_head = mask_head
        self.instance_in_features = instance_in_features
        self.mask_in_features = mask_in_features
        self.instance_strides = list(instance_strides)
        self.scale_ranges = [tuple(r) for r in scale_ranges]
        self.sigma = sigma
        self.mask_stride = backbone.output_shape()[mask_in_features[0]].stride
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
        self.register_load_state_dict_pre_hook(_log_checkpoint_layout)
        if nms_type not in ("matrix", "mask"):
            raise ValueError(f"MODEL.SOLO.NMS_TYPE must be 'matrix' or 'mask', got {nms_type!r}")
        if nms_kernel not in ("gaussian", "linear"):
            raise ValueError(f"MODEL.SOLO.NMS_KERNEL must be 'gaussian'/'linear': {nms_kernel!r}")
        n = len(ins_head.num_grids)
        if not (len(instance_in_features) == len(instance_strides) == len(scale_ranges) == n):
            raise ValueError(
                "MODEL.SOLO.INSTANCE_IN_FEATURES, FPN_INSTANCE_STRIDES, FPN_SCALE_RANGES and "
                f"NUM_GRIDS must have the same length, got {len(instance_in_features)}, "
                f"{len(instance_strides)}, {len(scale_ranges)} and {n}"
            )

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        sc = cfg.MODEL.SOLO
        for key in ("INSTANCE_IN_FEATURES", "MASK_IN_FEATURES"):
            missing = [f for f in sc[key] if f not in shapes]
            if missing:
                raise ValueError(
                    f"MODEL.SOLO.{key} names {missing}, not produced by the backbone "
                    f"(it produces {sorted(shapes)})"
                )
        return {
            "backbone": backbone,
            "ins_head": SOLOv2InstanceHead(cfg, [shapes[f] for f in sc.INSTANCE_IN_FEATURES]),
            "mask_head": SOLOv2MaskHead(cfg, [shapes[f] for f in sc.MASK_IN_FEATURES]),
            "instance_in_features": sc.INSTANCE_IN_FEATURES,
            "mask_in_features": sc.MASK_IN_FEATURES,
            "instance_strides": sc.FPN_INSTANCE_STRIDES,
            "scale_ranges": sc.FPN_SCALE_RANGES,
            "sigma": sc.SIGMA,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
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
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def predict(self, images: Tensor) -> Tuple[List[Tensor], List[Tensor], Tensor]:
        """Head outputs for a padded batch.

        Args:
            images: (B, 3, H, W) normalised, padded to the backbone's size divisibility.
        Returns:
            cate_logits: L tensors (B, C, S_l, S_l); kernels: L tensors (B, E, S_l, S_l);
            mask_feat: (B, E, Hf, Wf).
        """
        features = self.backbone(images)
        ins_feats = split_instance_features([features[f] for f in self.instance_in_features])
        cate_logits, kernels = self.ins_head(ins_feats)
        mask_feat = self.mask_head([features[f] for f in self.mask_in_features])
        return cate_logits, kernels, mask_feat

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        if "instances" not in batched_inputs[0]:
            raise ValueError(
                "SOLOv2 training needs 'instances' in every input (use SOLODatasetMapper)"
            )
        gt = [x["instances"].to(self.device) for x in batched_inputs]
        cate_logits, kernels, mask_feat = self.predict(images.tensor)
        return self.losses(cate_logits, kernels, mask_feat, gt)

    def losses(
        self,
        cate_logits: List[Tensor],
        kernels: List[Tensor],
        mask_feat: Tensor,
        gt: List[Instances],
    ) -> Dict[str, Tensor]:
        """Assign grid targets on the padded canvas, then focal + dice losses.

        Args:
            cate_logits, kernels, mask_feat: outputs of :meth:`predict`.
            gt: per image, Instances with gt_classes (N,), gt_boxes, gt_centers (N, 2) and
                gt_masks_small (N, h', w') uint8 at the mask stride.
        Returns:
            {"loss_cls", "loss_mask"}.
        """
        num_images = len(gt)
        hf, wf = mask_feat.shape[-2:]
        device = mask_feat.device
        image_ids = torch.cat(
            [torch.full((len(g),), i, dtype=torch.int64, device=device) for i, g in enumerate(gt)]
        )
        cate_labels, positives = assign_grid_targets(
            boxes=torch.cat([g.gt_boxes.tensor for g in gt]),
            centers=torch.cat([g.gt_centers for g in gt]),
            labels=torch.cat([g.gt_classes for g in gt]),
            image_ids=image_ids,
            num_images=num_images,
            canvas_hw=(hf * self.mask_stride, wf * self.mask_stride),
            num_grids=self.ins_head.num_grids,
            scale_ranges=self.scale_ranges,
            sigma=self.sigma,
            num_classes=self.ins_head.num_classes,
        )
        loss_cls = self.focal_weight * category_loss(
            cate_logits, cate_labels, alpha=self.focal_alpha, gamma=self.focal_gamma
        )

        # positive kernels of every level: (P, E), with their image and instance
        pos_kernels, pos_images, pos_insts = [], [], []
        for k, pos in zip(kernels, positives):
            pos_kernels.append(k.flatten(2)[pos[:, 0], :, pos[:, 1]])  # (P_l, E)
            pos_images.append(pos[:, 0])
            pos_insts.append(pos[:, 2])
        pos_kernels = torch.cat(pos_kernels)
        pos_images, pos_insts = torch.cat(pos_images), torch.cat(pos_insts)
        num_pos = len(pos_insts)
        storage = get_event_storage()
        storage.put_scalar("solo/num_pos_samples", num_pos / num_images)
        storage.put_scalar(
            "solo/num_pos_cells",
            sum(int((c != self.ins_head.num_classes).sum()) for c in cate_labels) / num_images,
        )
        if num_pos == 0:
            # keep every output in the graph so DDP sees gradients for all parameters
            zero = mask_feat.sum() * 0 + sum(k.sum() for k in kernels) * 0
            return {"loss_cls": loss_cls, "loss_mask": zero}

        targets = torch.zeros(len(image_ids), hf, wf, dtype=torch.uint8, device=device)
        offset = 0
        for g in gt:  # paste each image's small masks top-left into the batch canvas
            small = g.gt_masks_small
            targets[offset : offset + len(g), : small.shape[1], : small.shape[2]] = small
            offset += len(g)
        feat = mask_feat.flatten(2)  # (B, E, Hf*Wf)
        dice = []
        for b in range(num_images):  # one matmul per image, as many kernels as it has positives
            sel = pos_images == b
            if sel.any():
                probs = torch.sigmoid(pos_kernels[sel] @ feat[b])  # (P_b, Hf*Wf)
                dice.append(dice_loss(probs, targets[pos_insts[sel]].flatten(1)))
        loss_mask = self.dice_weight * torch.cat(dice).mean()
        return {"loss_cls": loss_cls, "loss_mask": loss_mask}

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
        cate_logits, kernels, mask_feat = self.predict(images.tensor)
        num_classes, e = self.ins_head.num_classes, kernels[0].shape[1]
        # (B, G, C) scores after points NMS and (B, G, E) kernels, levels concatenated row-major
        cate = torch.cat(
            [
                point_nms(c.sigmoid()).permute(0, 2, 3, 1).reshape(len(c), -1, num_classes)
                for c in cate_logits
            ],
            dim=1,
        )
        kern = torch.cat([k.permute(0, 2, 3, 1).reshape(len(k), -1, e) for k in kernels], dim=1)
        cell_strides = torch.cat(
            [
                torch.full((s * s,), st, dtype=torch.float32, device=cate.device)
                for s, st in zip(self.ins_head.num_grids, self.instance_strides)
            ]
        )
        results = []
        for b, x in enumerate(batched_inputs):
            image_hw = tuple(images.image_sizes[b])
            output_hw = (x.get("height", image_hw[0]), x.get("width", image_hw[1]))
            r = solov2_postprocess(
                cate[b], kern[b], cell_strides, mask_feat[b], self.mask_stride, image_hw, output_hw,
                **self.inference_args,
            )  # fmt: skip
            results.append({"instances": r})
        return results
