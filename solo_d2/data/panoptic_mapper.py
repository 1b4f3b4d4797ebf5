"""``SOLOPanopticDatasetMapper``: the SOLO mapper for panoptic models (``PanopticSOLO``).

On top of :class:`~solo_d2.data.dataset_mapper.SOLODatasetMapper`, images of panoptic data
(dicts with "pan_seg_file_name" and "segments_info", :mod:`solo_d2.data.panoptic`) have their
PNG read and checked (in evaluation too: a bad PNG is found before the model runs), and in
training the instances are the non-crowd thing segments of the PNG and ``dataset_dict["sem_seg"]``
is the (H, W) int64 semantic target (stuff ids 1..K_st, things 0, void 255;
:func:`solo_d2.modeling.targets.panoptic_targets`). Dicts without a PNG are mapped as instance
data.
"""

import numpy as np
import torch
from detectron2.structures import BitMasks, Instances

from ..modeling.targets import panoptic_targets
from .dataset_mapper import SOLODatasetMapper
from .panoptic import read_panoptic_png, rgb_to_id

__all__ = ["SOLOPanopticDatasetMapper"]

# the dataset dict's key holding the PNG between reading and the targets
_PNG_KEY = "_panoptic_rgb"


class SOLOPanopticDatasetMapper(SOLODatasetMapper):
    """SOLODatasetMapper that also reads panoptic PNGs and builds the semantic target (see the
    module docstring); the same arguments and the same skipping of unreadable training images
    (a bad PNG counts as an unreadable image)."""

    def __call__(self, dataset_dict):
        mapped = super().__call__(dataset_dict)
        if mapped is not None:
            mapped.pop(_PNG_KEY, None)  # evaluation: read for its checks only
        return mapped

    def load(self, dataset_dict: dict) -> np.ndarray:
        image = super().load(dataset_dict)
        if "pan_seg_file_name" in dataset_dict:
            dataset_dict[_PNG_KEY] = read_panoptic_png(dataset_dict, image.shape[:2])
        return image

    def add_targets(self, dataset_dict: dict, transforms, image_shape) -> None:
        rgb = dataset_dict.pop(_PNG_KEY, None)
        if rgb is None:
            super().add_targets(dataset_dict, transforms, image_shape)
            return
        ids = rgb_to_id(transforms.apply_segmentation(rgb))
        masks, classes, sem_seg = panoptic_targets(ids, dataset_dict["segments_info"])
        dataset_dict["sem_seg"] = torch.as_tensor(sem_seg)
        masks = torch.as_tensor(masks)
        instances = Instances(tuple(masks.shape[-2:]))
        instances.gt_boxes = BitMasks(masks).get_bounding_boxes()
        instances.gt_classes = torch.as_tensor(classes)
        self._add_mask_targets(dataset_dict, instances, masks)
