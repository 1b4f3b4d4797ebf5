"""The SOLO-family META_ARCH: backbone + instance head (+ SOLOv2's mask-feature branch).

One engine for every variant: the same criterion (:mod:`.criterion`: target assignment and
losses) and post-processing (:mod:`.postprocessing`); the instance head chosen by
``MODEL.SOLO.HEAD`` (heads.SOLO_HEAD_REGISTRY) says how a grid cell's mask is represented and
read, in training, inference and export. ``SOLO`` itself does pre-processing, the backbone, the
heads and inference; :class:`~.panoptic.PanopticSOLO` extends it with a stuff branch.

Shape shorthand:
    B: images    L: instance levels    S_l: grid size    C: classes    E: kernel length
    Hc, Wc: padded batch canvas    Hf, Wf: mask size at the mask stride    P: positive samples
    M: instances of the batch
"""

import copy
import logging
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList, Instances
from torch import Tensor, nn

from ..checkpoint.adelaidet import is_adelaidet_solov2_state_dict
from .backbone import fold_frozen_batchnorm
from .criterion import SOLOCriterion
from .heads import (
    SoftMasks,
    SOLOHead,
    SOLOv2MaskHead,
    build_solo_head,
    mask_target_strides,
    split_instance_features,
)
from .postprocessing import category_scores, cell_strides, solo_postprocess
from .tiling import TileSettings, tile_settings, tiled_inference

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


def _drop_folded_backbone(module, incompatible_keys) -> None:
    module._folded_backbone.clear()  # the weights were loaded: fold them again when needed


@META_ARCH_REGISTRY.register()
class SOLO(nn.Module):
    """SOLO (Wang et al., ECCV 2020), Decoupled SOLO and SOLOv2 (NeurIPS 2020), light variants.

    Input: detectron2's list of dicts with "image" (C, H, W) and, in training, "instances" made by
    :class:`solo_d2.data.SOLODatasetMapper` (gt_classes, gt_boxes, gt_centers, gt_masks_small and,
    for heads predicting masks at several strides, gt_masks_small_s{stride}).
    Output in eval mode: ``[{"instances": Instances}]`` at the requested ("height", "width") size
    with bool pred_masks, pred_boxes (from the masks), scores and int64 pred_classes.

    Eval-mode results do not depend on the grad mode: inference always runs the backbone of
    :meth:`inference_backbone`, with or without ``torch.no_grad()`` (with ``fold_frozen_bn``, its
    features carry no gradient to the backbone's weights in eval mode).
    """

    # outputs of eval-mode forward that export leaves out (solo_d2.export.SOLOExportable)
    unexported_outputs: Tuple[str, ...] = ()

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
        criterion: SOLOCriterion,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
        mask_strides: List[int],
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
        channels_last: bool = True,
        fold_frozen_bn: bool = True,
        channels_last_train: bool = False,
        tiling: Optional[TileSettings] = None,
    ):
        """
        Args:
            backbone: a Backbone producing ``instance_in_features`` and ``mask_in_features``.
            ins_head: the variant's instance head.
            mask_head: SOLOv2's mask-feature branch, or None for heads that need none.
            instance_in_features, mask_in_features: backbone feature names of each branch.
            instance_strides: effective stride of each (split) instance level.
            criterion: target assignment and losses (:class:`~.criterion.SOLOCriterion`).
            pixel_mean, pixel_std: input normalisation.
            mask_strides: stride of each level's mask prediction (``heads.mask_target_strides``).

            # Inference parameters:
            score_threshold, mask_threshold, nms_pre, update_threshold, nms_type, nms_kernel,
            nms_sigma, max_per_image, chunk_size: see :func:`solo_postprocess`.

            channels_last: in eval mode, store the 4-D weights channels-last (NHWC): same
                results up to float rounding, faster convolutions on CPU. The layout follows the
                mode (:meth:`train` / ``eval()``: :meth:`apply_memory_format`); ``.to(device)``
                and checkpoint loading keep it. The default is the config's
                (``MODEL.SOLO.CHANNELS_LAST``, True); :meth:`from_config` applies it on the CPU
                only (``MODEL.DEVICE``): on CUDA the model keeps detectron2's layout, the lever
                having been measured on CPU only.
            fold_frozen_bn: in eval mode, run the backbone through a copy whose FrozenBatchNorm
                layers are folded into the preceding convs (:meth:`inference_backbone`): same
                results up to float rounding, faster. As the config (``FOLD_FROZEN_BN``), True.
            channels_last_train: channels-last in training mode too. The config's
                ``CHANNELS_LAST_TRAIN`` None ("auto") turns it on where the CPU has AVX-512 (a
                training step 0.88x the time there, 1.22x on an AVX2-only CPU).
        """
        super().__init__()
        # (folded copy of the backbone, (device, dtype) it was made for); a list, so that the
        # copy is not a submodule: not in state_dict(), parameters() or .to()
        self._folded_backbone: list = []
        self.backbone = backbone
        self.ins_head = ins_head
        self.mask_head = mask_head
        if ins_head.uses_mask_features and mask_head is None:
            raise ValueError(f"{type(ins_head).__name__} needs a mask-feature branch (mask_head)")
        self.instance_in_features = instance_in_features
        self.mask_in_features = mask_in_features
        self.instance_strides = list(instance_strides)
        self.criterion = criterion
        self.mask_strides = list(mask_strides)
        # stride of the soft masks at inference, and of the gt_masks_small field
        self.mask_stride = min(self.mask_strides)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
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
        self.register_load_state_dict_post_hook(_drop_folded_backbone)
        if nms_type not in ("matrix", "mask"):
            raise ValueError(f"MODEL.SOLO.NMS_TYPE must be 'matrix' or 'mask', got {nms_type!r}")
        if nms_kernel not in ("gaussian", "linear"):
            raise ValueError(f"MODEL.SOLO.NMS_KERNEL must be 'gaussian'/'linear': {nms_kernel!r}")
        n = len(ins_head.num_grids)
        if not (
            len(instance_in_features)
            == len(instance_strides)
            == len(criterion.scale_ranges)
            == len(self.mask_strides)
            == n
        ):
            raise ValueError(
                "MODEL.SOLO.INSTANCE_IN_FEATURES, FPN_INSTANCE_STRIDES, FPN_SCALE_RANGES and "
                f"NUM_GRIDS must have the same length, got {len(instance_in_features)}, "
                f"{len(instance_strides)}, {len(criterion.scale_ranges)} and {n}"
            )
        # instance stride of every grid cell's level: the area filter at inference
        self.register_buffer(
            "cell_strides", cell_strides(ins_head.num_grids, instance_strides), False
        )
        self.channels_last = channels_last
        self.channels_last_train = channels_last_train
        self.fold_frozen_bn = fold_frozen_bn
        self.tiling = tiling
        self.apply_memory_format()

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
        mask_strides = mask_target_strides(cfg)
        return {
            "backbone": backbone,
            "ins_head": ins_head,
            "mask_head": mask_head,
            "instance_in_features": sc.INSTANCE_IN_FEATURES,
            "mask_in_features": sc.MASK_IN_FEATURES,
            "instance_strides": sc.FPN_INSTANCE_STRIDES,
            "criterion": SOLOCriterion.from_config(cfg, ins_head, mask_strides),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "mask_strides": mask_strides,
            "score_threshold": sc.SCORE_THRESH_TEST,
            "mask_threshold": sc.MASK_THRESH_TEST,
            "nms_pre": sc.NMS_PRE_TOPK,
            "update_threshold": sc.UPDATE_THRESH_TEST,
            "nms_type": sc.NMS_TYPE,
            "nms_kernel": sc.NMS_KERNEL,
            "nms_sigma": sc.NMS_SIGMA,
            "max_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "chunk_size": sc.INFERENCE_CHUNK_SIZE,
            # CPU timings chose channels-last; CUDA keeps detectron2's layout (not measured there)
            "channels_last": sc.CHANNELS_LAST and torch.device(cfg.MODEL.DEVICE).type == "cpu",
            "fold_frozen_bn": sc.FOLD_FROZEN_BN,
            "channels_last_train": _channels_last_train(sc.CHANNELS_LAST_TRAIN)
            and torch.device(cfg.MODEL.DEVICE).type == "cpu",
            "tiling": tile_settings(cfg),
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
        """Backbone features: in eval mode through :meth:`inference_backbone`, whatever the grad
        mode; in training, and when traced for export, through the backbone itself (ONNX Runtime
        folds the norms itself)."""
        if self.training or torch.jit.is_tracing():
            return self.backbone(images)
        return self.inference_backbone()(images)

    def train(self, mode: bool = True):
        """nn.Module.train; also drops the folded backbone copy, made again from the current
        weights when next needed (the weights change in training), and gives the weights the
        mode's memory layout (:meth:`apply_memory_format`)."""
        self._folded_backbone.clear()
        super().train(mode)
        self.apply_memory_format()
        return self

    def apply_memory_format(self) -> None:
        """Store the 4-D weights and buffers in the current mode's layout: channels-last with
        ``channels_last`` in eval mode and with ``channels_last_train`` in training mode,
        contiguous (NCHW) otherwise. In place (``param.data``): optimizers keep their
        parameters."""
        on = self.channels_last_train if self.training else self.channels_last
        self.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def inference_backbone(self) -> nn.Module:
        """The backbone to run inference with: with ``fold_frozen_bn``, a copy with its
        FrozenBatchNorm layers folded into their convs (:func:`~.backbone.fold_frozen_batchnorm`),
        else the backbone itself.

        The copy is made from the weights when first needed and kept until an explicit signal
        says the weights may have changed: :meth:`train` / ``eval()`` (training steps happen in
        training mode), ``load_state_dict`` (a state-dict hook), or a move to another device or
        dtype. Weights edited in place in eval mode are seen after ``model.eval()``. The copy holds
        a second set of backbone weights (R50-FPN: about 110 MB); a backbone without
        FrozenBatchNorm is used as it is.
        """
        if not self.fold_frozen_bn:
            return self.backbone
        ref = next(self.backbone.parameters(), None)
        key = None if ref is None else (ref.device, ref.dtype)
        if not self._folded_backbone or self._folded_backbone[1] != key:
            self._folded_backbone.clear()  # free the old copy before making the new one
            with torch.inference_mode(False), torch.no_grad():
                folded = copy.deepcopy(self.backbone).eval().requires_grad_(False)
                if fold_frozen_batchnorm(folded) == 0:  # no FrozenBN (BN, GN): no second copy
                    folded = self.backbone
            self._folded_backbone[:] = [folded, key]
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
        return self.losses(images, self.backbone(images.tensor), batched_inputs)

    def losses(
        self, images: ImageList, features: Dict[str, Tensor], batched_inputs: List[Dict]
    ) -> Dict[str, Tensor]:
        """Training losses of a batch from its backbone features (:attr:`criterion`).

        Args:
            images: the preprocessed batch; features: the backbone's features of it.
            batched_inputs: the inputs, with their "instances" (see the class docstring).
        Returns:
            {"loss_cls", "loss_mask"}.
        """
        gt = [x["instances"].to(self.device) for x in batched_inputs]
        canvas_hw = tuple(images.tensor.shape[-2:])
        cate_logits, mask_preds, mask_feat = self._predict(features)
        return self.criterion(
            cate_logits, mask_preds, mask_feat, gt, canvas_hw, self.ins_head.positive_masks
        )

    def inference(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        """Run images with the same padded size together, so batching never changes a result.

        SOLO's grid cells and coordinates are relative to the padded canvas, so an image padded
        to a larger batch canvas would get different predictions than alone. With ``tiling``,
        each image is tiled (:func:`.tiling.tiled_inference`) and the tiles batched.
        """
        if self.tiling is not None:
            max_det = self.inference_args["max_per_image"]
            return tiled_inference(batched_inputs, self._untiled, self.tiling, max_det)
        return self._inference_by_size(batched_inputs)

    def _untiled(self, batched_inputs: List[Dict]) -> List[Instances]:
        return [r["instances"] for r in self._inference_by_size(batched_inputs)]

    def _inference_by_size(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
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

    def _inference_same_size(self, batched_inputs: List[Dict]) -> List[Dict]:
        images = self.preprocess_image(batched_inputs)
        return self.inference_outputs(images, self._features(images.tensor), batched_inputs)

    def inference_outputs(
        self, images: ImageList, features: Dict[str, Tensor], batched_inputs: List[Dict]
    ) -> List[Dict]:
        """Per image, the eval-mode outputs of a batch of one padded size from its backbone
        features: ``{"instances": Instances}`` (:meth:`postprocess`)."""
        return self.postprocess(images, self._predict(features), batched_inputs)


@META_ARCH_REGISTRY.register()
class SOLOv2(SOLO):
    """The META_ARCH name configs used before the family was generalised: the same engine as
    :class:`SOLO`, its head also chosen by ``MODEL.SOLO.HEAD`` (SOLOv2's by default)."""


def _channels_last_train(value) -> bool:
    """MODEL.SOLO.CHANNELS_LAST_TRAIN resolved: True/False as given; None or "auto": whether the
    CPU has AVX-512, where channels-last training was measured faster."""
    if value is None or value == "auto":
        return "AVX512" in torch.backends.cpu.get_cpu_capability()
    if not isinstance(value, bool):
        raise ValueError(f"MODEL.SOLO.CHANNELS_LAST_TRAIN must be True, False or None: {value!r}")
    return value


def _check_features(sc, shapes, branch: str, prefix: str = "MODEL.SOLO.") -> List[str]:
    key = f"{branch}_IN_FEATURES" if branch else "IN_FEATURES"
    missing = [f for f in sc[key] if f not in shapes]
    if missing:
        raise ValueError(
            f"{prefix}{key} names {missing}, not produced by the backbone "
            f"(it produces {sorted(shapes)})"
        )
    return list(sc[key])
