"""``SOLODatasetMapper``: detectron2's DatasetMapper plus SOLO's per-instance targets.

Runs in the data-loader workers. On top of detectron2's image loading, augmentation
(ResizeShortestEdge, flip) and annotation transforms (polygons, RLE and bitmasks all accepted,
rasterised at the augmented size), it computes every target quantity that does not depend on
batch padding: centre of mass and the mask rescaled to the mask-prediction stride. The model
assigns grid cells once the padded batch size is known (see solo_d2/modeling/targets.py).

Bad data (see docs/reliability.md): images are read with :func:`solo_d2.data.images.read_image`
(clear errors, 16-bit / CMYK / EXIF handled, images of more than ``INPUT.MAX_IMAGE_PIXELS``
pixels refused before decoding). In training, an image that cannot be read or whose size differs
from its annotation is skipped with a warning naming it (detectron2's MapDataset then takes
another image), and so is an annotation that cannot be transformed; with ``DATASETS.STRICT`` both
are errors. In evaluation an unreadable image is always an error.
"""

import copy
import logging
from typing import Optional, Sequence

import detectron2.data.transforms as T
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.structures import Instances

from ..config.defaults import DEFAULT_MAX_IMAGE_PIXELS
from ..modeling import mask_target_strides
from ..modeling.targets import extra_mask_targets, instance_targets
from . import tiling
from .images import BadImageError, read_image

__all__ = ["SOLODatasetMapper", "check_image_size"]

logger = logging.getLogger(__name__)

# Training stops when this many images in a row could not be read by a worker that has not read
# any: the dataset is unusable (e.g. the wrong image folder), and skipping would loop forever.
MAX_FAILURES_BEFORE_ANY_SUCCESS = 50


def check_image_size(dataset_dict: dict, image: np.ndarray) -> None:
    """Raise BadImageError when ``image`` is not the size the dataset dict records.

    The usual cause is an EXIF orientation tag: the image is read rotated (as displayed) while
    the annotation tool measured the stored pixels; the message says so when the sizes are
    swapped.
    """
    if "height" not in dataset_dict or "width" not in dataset_dict:
        return
    h, w = image.shape[:2]
    expected = (dataset_dict["height"], dataset_dict["width"])
    if (h, w) == expected:
        return
    hint = ""
    if (w, h) == expected:
        hint = (
            "; the sizes are swapped: the image has an EXIF orientation tag (it is read rotated "
            "as displayed) and the annotations were made on the unrotated pixels"
        )
    raise BadImageError(
        dataset_dict["file_name"],
        f"is {w}x{h} (width x height) but the annotation file says "
        f"{expected[1]}x{expected[0]} (image id {dataset_dict.get('image_id')}){hint}",
    )


class SOLODatasetMapper(DatasetMapper):
    """DatasetMapper whose "instances" carry gt_classes, gt_boxes, gt_centers and gt_masks_small.

    Fields of ``dataset_dict["instances"]`` in training (N instances with a non-empty mask):
        gt_classes: (N,) int64; gt_boxes: Boxes (N, 4) XYXY in input pixels;
        gt_centers: (N, 2) float32 centre of mass [cx, cy];
        gt_masks_small: (N, int(H/s+0.5), int(W/s+0.5)) uint8 masks at the mask stride s;
        gt_masks_small_s{t}: the same at each coarser stride t the model predicts masks at
            (SOLO v1 / Decoupled SOLO: 8 and 16).
    Panoptic models take :class:`~solo_d2.data.panoptic_mapper.SOLOPanopticDatasetMapper`, which
    extends :meth:`load` and :meth:`add_targets`.

    Returns None for a training image it skips (see the module docstring).
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        mask_strides: Sequence[int] = (4,),
        strict: bool = False,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        tile_min_visible: Optional[float] = None,
        **kw,
    ):
        """
        Args:
            mask_strides: every stride the model predicts masks at, one per level
                (``solo_d2.modeling.mask_target_strides``). ``gt_masks_small`` is at the finest
                (the model's mask stride); SOLO v1 / Decoupled SOLO also get a field for each
                coarser stride.
            strict: in training, raise on an unreadable image or an unusable annotation
                instead of skipping it with a warning.
            max_image_pixels: images of more pixels are unreadable (refused before decoding).
            tile_min_visible: training on tiles (:mod:`.tiling`, which sets it with the
                augmentations): drop annotations with less of their box inside the tile.
            kw: as :class:`detectron2.data.DatasetMapper`; masks are always used, as bitmasks.
        """
        kw.update(use_instance_mask=True, instance_mask_format="bitmask")
        super().__init__(is_train, **kw)
        self.mask_strides = tuple(mask_strides)
        self.mask_stride = min(self.mask_strides)
        self.strict = strict
        self.max_image_pixels = max_image_pixels
        self.tile_min_visible = tile_min_visible
        self._num_read = self._num_failed = 0

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["mask_strides"] = mask_target_strides(cfg)
        ret["strict"] = cfg.DATASETS.STRICT
        ret["max_image_pixels"] = cfg.INPUT.MAX_IMAGE_PIXELS
        ret.update(tiling.mapper_args(cfg, is_train, ret["augmentations"]))
        return ret

    def _read(self, dataset_dict: dict):
        """The checked image of ``dataset_dict``, or None when a training image is skipped."""
        try:
            image = self.load(dataset_dict)
        except BadImageError as e:
            if not self.is_train or self.strict:
                raise
            self._num_failed += 1
            if self._num_read == 0 and self._num_failed >= MAX_FAILURES_BEFORE_ANY_SUCCESS:
                raise BadImageError(
                    e.path,
                    f"{e.reason}; none of the {self._num_failed} training images tried so far "
                    "could be read, check the image folder of the dataset",
                ) from e
            logger.warning(
                f"Skipping training image (image id {dataset_dict.get('image_id')}): {e}"
            )
            return None
        self._num_read += 1
        return image

    def load(self, dataset_dict: dict) -> np.ndarray:
        """The image of ``dataset_dict``, read and checked against its recorded size.

        Raises:
            BadImageError: naming the file, when it cannot be used.
        """
        image = read_image(
            dataset_dict["file_name"], self.image_format, max_pixels=self.max_image_pixels
        )
        check_image_size(dataset_dict, image)
        return image

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict: one image in detectron2's dataset format.
        Returns:
            the model input dict, or None for a skipped training image.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self._read(dataset_dict)
        if image is None:
            return None
        tiled = self.is_train and self.tile_min_visible is not None
        boxes = tiling.annotation_boxes(dataset_dict) if tiled else None  # where the tiles go
        aug_input = T.AugInput(image, boxes=boxes)
        transforms = self.augmentations(aug_input)
        if tiled:
            tiling.tile_annotations(dataset_dict, transforms, self.tile_min_visible)
        image = aug_input.image
        image_shape = image.shape[:2]  # h, w
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        self.add_targets(dataset_dict, transforms, image_shape)
        return dataset_dict

    def add_targets(self, dataset_dict: dict, transforms, image_shape) -> None:
        """Training targets: ``dataset_dict["instances"]`` from its "annotations".

        Args:
            dataset_dict: the input dict being built (its "image" is set).
            transforms: the augmentations applied to the image.
            image_shape: (h, w) of the augmented image.
        """
        dataset_dict.setdefault("annotations", [])
        self._solo_annotations(dataset_dict, transforms, image_shape)

    def _bad_annotation(self, dataset_dict: dict, obj: dict, reason: str) -> None:
        message = (
            f"annotation id {obj.get('id')} of image id {dataset_dict.get('image_id')} "
            f"({dataset_dict['file_name']}) {reason}"
        )
        if self.strict:
            raise ValueError(f"Bad training annotation: {message} (DATASETS.STRICT is on)")
        logger.warning(f"Skipping training annotation: {message}")

    def _solo_annotations(self, dataset_dict, transforms, image_shape):
        annos = []
        for obj in dataset_dict.pop("annotations"):
            if obj.get("iscrowd", 0):
                continue
            segm = obj.get("segmentation")
            if segm is None or (isinstance(segm, (list, dict)) and len(segm) == 0):
                self._bad_annotation(dataset_dict, obj, "has no segmentation")
                continue
            try:
                annos.append(utils.transform_instance_annotations(obj, transforms, image_shape))
            except (AssertionError, ValueError, TypeError, KeyError, IndexError) as e:
                self._bad_annotation(dataset_dict, obj, f"cannot be transformed ({e!r})")
        instances = utils.annotations_to_instances(annos, image_shape, mask_format="bitmask")
        if self.recompute_boxes and len(annos):
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        instances = utils.filter_empty_instances(instances)
        if instances.has("gt_masks"):
            masks = instances.gt_masks.tensor
            instances.remove("gt_masks")
        else:  # an image without annotations
            masks = torch.zeros((0, *image_shape), dtype=torch.bool)
        self._add_mask_targets(dataset_dict, instances, masks)

    def _add_mask_targets(self, dataset_dict: dict, instances: Instances, masks: torch.Tensor):
        """Add centres and rescaled masks (:func:`instance_targets`) to ``instances``, keep the
        instances with a non-empty mask and store them in ``dataset_dict["instances"]``."""
        valid, centers, small = instance_targets(masks, self.mask_stride)
        instances.gt_centers = centers
        instances.gt_masks_small = small
        for name, coarse in extra_mask_targets(masks, self.mask_stride, self.mask_strides).items():
            instances.set(name, coarse)
        dataset_dict["instances"] = instances[valid]
