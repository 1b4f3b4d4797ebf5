"""``SOLODatasetMapper``: detectron2's DatasetMapper plus SOLO's per-instance targets.

Runs in the data-loader workers. On top of detectron2's image loading, augmentation
(ResizeShortestEdge, flip) and annotation transforms (polygons, RLE and bitmasks all accepted,
rasterised at the augmented size), it computes every target quantity that does not depend on
batch padding: centre of mass and the mask rescaled to the mask-prediction stride. The model
assigns grid cells once the padded batch size is known (see solo_d2/modeling/targets.py).
"""

import re

import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper

from ..modeling.targets import instance_targets

__all__ = ["SOLODatasetMapper", "feature_stride"]


def feature_stride(name: str) -> int:
    """Stride of an FPN feature named "pN" (2**N), e.g. "p2" -> 4."""
    m = re.fullmatch(r"p(\d+)", name)
    if m is None:
        raise ValueError(f"MODEL.SOLO.MASK_IN_FEATURES[0] must be an FPN level 'pN', got {name!r}")
    return 2 ** int(m.group(1))


class SOLODatasetMapper(DatasetMapper):
    """DatasetMapper whose "instances" carry gt_classes, gt_boxes, gt_centers and gt_masks_small.

    Fields of ``dataset_dict["instances"]`` in training (N instances with a non-empty mask):
        gt_classes: (N,) int64; gt_boxes: Boxes (N, 4) XYXY in input pixels;
        gt_centers: (N, 2) float32 centre of mass [cx, cy];
        gt_masks_small: (N, int(H/s+0.5), int(W/s+0.5)) uint8 masks at the mask stride s.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, mask_stride: int = 4, **kwargs):
        """
        Args:
            mask_stride: stride of the mask prediction the small masks are made for.
            kwargs: as :class:`detectron2.data.DatasetMapper`; masks are always used, as bitmasks.
        """
        kwargs.update(use_instance_mask=True, instance_mask_format="bitmask")
        super().__init__(is_train, **kwargs)
        self.mask_stride = mask_stride

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["mask_stride"] = feature_stride(cfg.MODEL.SOLO.MASK_IN_FEATURES[0])
        return ret

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        super()._transform_annotations(dataset_dict, transforms, image_shape)
        instances = dataset_dict["instances"]
        if instances.has("gt_masks"):
            masks = instances.gt_masks.tensor
            instances.remove("gt_masks")
        else:  # an image without annotations
            masks = torch.zeros((0, *image_shape), dtype=torch.bool)
        valid, centers, small = instance_targets(masks, self.mask_stride)
        instances.gt_centers = centers
        instances.gt_masks_small = small
        dataset_dict["instances"] = instances[valid]
