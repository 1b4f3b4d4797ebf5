"""The SOLO-family training criterion: grid targets on the padded batch canvas, then the losses
(the role of Mask2Former's ``SetCriterion``).

Shape shorthand:
    B: images    L: instance levels    S_l: grid size    C: classes    P: positive samples
    M: instances of the batch    Hc, Wc: padded batch canvas
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from .losses import category_loss, dice_loss
from .targets import assign_grid_targets, mask_target_field

__all__ = ["SOLOCriterion"]

# The head's mask reading of positive samples: (level's mask prediction, mask features or None,
# image indices (P,), cell indices (P,)) -> (P, h, w) probabilities (SOLOHead.positive_masks).
PositiveMasks = Callable[[Tensor, Optional[Tensor], Tensor, Tensor], Tensor]


class SOLOCriterion(nn.Module):
    """Assigns grid targets to a batch and computes ``loss_cls`` (sigmoid focal loss over every
    cell and class) and ``loss_mask`` (dice over the positive samples).

    It holds no parameters (nothing in the model's state_dict). The target policy comes from the
    head variant (``SOLOHead.last_instance_wins``): SOLOv2 trains a cell shared by several
    instances once per instance; SOLO and Decoupled SOLO, whose dense per-cell targets the
    reference overwrites, keep the last instance (:func:`~.targets.assign_grid_targets`).
    """

    def __init__(
        self,
        *,
        num_grids: Sequence[int],
        num_classes: int,
        scale_ranges: Sequence[Tuple[float, float]],
        sigma: float,
        mask_strides: Sequence[int],
        last_instance_wins: bool,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        focal_weight: float = 1.0,
        dice_weight: float = 3.0,
    ):
        """
        Args:
            num_grids: S per level; num_classes: C.
            scale_ranges: (lo, hi) of sqrt(box area) per level.
            sigma: centre-region scale.
            mask_strides: stride of each level's mask prediction; the finest is the stride of
                the ``gt_masks_small`` field.
            last_instance_wins: the head's target policy (see the class docstring).
            focal_alpha, focal_gamma, focal_weight: category focal loss.
            dice_weight: weight of the dice mask loss.
        """
        super().__init__()
        self.num_grids = list(num_grids)
        self.num_classes = num_classes
        self.scale_ranges = [tuple(r) for r in scale_ranges]
        self.sigma = sigma
        self.mask_strides = list(mask_strides)
        self.mask_stride = min(self.mask_strides)
        self.last_instance_wins = last_instance_wins
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.focal_weight, self.dice_weight = focal_weight, dice_weight

    @classmethod
    def from_config(cls, cfg, ins_head, mask_strides: Sequence[int]) -> "SOLOCriterion":
        sc = cfg.MODEL.SOLO
        return cls(
            num_grids=ins_head.num_grids,
            num_classes=ins_head.num_classes,
            scale_ranges=sc.FPN_SCALE_RANGES,
            sigma=sc.SIGMA,
            mask_strides=mask_strides,
            last_instance_wins=ins_head.last_instance_wins,
            focal_alpha=sc.LOSS.FOCAL_ALPHA,
            focal_gamma=sc.LOSS.FOCAL_GAMMA,
            focal_weight=sc.LOSS.FOCAL_WEIGHT,
            dice_weight=sc.LOSS.DICE_WEIGHT,
        )

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
        device = gt[0].gt_classes.device
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
            num_grids=self.num_grids,
            scale_ranges=self.scale_ranges,
            sigma=self.sigma,
            num_classes=self.num_classes,
            last_instance_wins=self.last_instance_wins,
        )

    def mask_targets(self, gt: List[Instances], stride: int, canvas_hw: Tuple[int, int]) -> Tensor:
        """Each image's masks at ``stride``, pasted top-left into the batch canvas at that stride.

        Returns:
            (M, Hc / stride, Wc / stride) uint8.
        """
        field = mask_target_field(stride, self.mask_stride)
        out = torch.zeros(
            (sum(len(g) for g in gt), canvas_hw[0] // stride, canvas_hw[1] // stride),
            dtype=torch.uint8,
            device=gt[0].gt_classes.device,
        )
        offset = 0
        for g in gt:
            if len(g) and not g.has(field):
                raise ValueError(
                    f"training instances lack the field {field!r}: the model predicts masks at "
                    f"strides {sorted(set(self.mask_strides))}; build the inputs with "
                    "SOLODatasetMapper (it adds one field per stride)"
                )
            if len(g):
                small = g.get(field)
                out[offset : offset + len(g), : small.shape[1], : small.shape[2]] = small
            offset += len(g)
        return out

    def forward(
        self,
        cate_logits: List[Tensor],
        mask_preds: List[Tensor],
        mask_feat: Optional[Tensor],
        gt: List[Instances],
        canvas_hw: Tuple[int, int],
        positive_masks: PositiveMasks,
    ) -> Dict[str, Tensor]:
        """Assign grid targets on the padded canvas, then focal + dice losses.

        Args:
            cate_logits, mask_preds, mask_feat: the model's head outputs (``SOLO.predict``).
            gt: per image, Instances with gt_classes (N,), gt_boxes, gt_centers (N, 2) and the
                masks rescaled to each mask stride (gt_masks_small, gt_masks_small_s{stride}).
            canvas_hw: (Hc, Wc) padded batch size.
            positive_masks: the head's mask reading of positive samples.
        Returns:
            {"loss_cls", "loss_mask"}.
        """
        num_images = len(gt)
        cate_labels, positives = self.assign_targets(gt, canvas_hw)
        loss_cls = self.focal_weight * category_loss(
            cate_logits, cate_labels, alpha=self.focal_alpha, gamma=self.focal_gamma
        )

        num_pos = sum(len(p) for p in positives)
        storage = get_event_storage()
        storage.put_scalar("solo/num_pos_samples", num_pos / num_images)
        storage.put_scalar(
            "solo/num_pos_cells",
            sum(int((c != self.num_classes).sum()) for c in cate_labels) / num_images,
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
            probs = positive_masks(pred, mask_feat, pos[:, 0], pos[:, 1])
            stride = self.mask_strides[level]
            if stride not in targets:
                targets[stride] = self.mask_targets(gt, stride, canvas_hw)
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
