"""Training on tiles (``INPUT.TILE.TRAIN``) and the test input of tiled inference
(``INPUT.TILE.TEST``), for :class:`~solo_d2.data.SOLODatasetMapper`.

Training: each image becomes a ``SIZE`` x ``SIZE`` crop of its full resolution, resized by
``SCALE`` (:class:`TileCrop`, built on detectron2's ``CropTransform`` and ``ResizeTransform``),
placed to hold the centre of a random instance with probability ``INSTANCE_PROB`` (small objects
are found where they are) and uniformly otherwise; with probability ``WHOLE_IMAGE_PROB`` the
whole image is used instead, resized as usual (SAHI's fine-tuning mixes both: Akyon et al.,
arXiv:2202.06934). Instances are clipped to the crop by detectron2's annotation transforms, their
boxes recomputed from the clipped masks (``recompute_boxes``), and the ones with less than
``MIN_VISIBLE`` of their box inside the crop dropped (:func:`tile_annotations`).

Inference: with ``INPUT.TILE.TEST`` the model tiles the image itself
(:mod:`solo_d2.modeling.tiling`), so the test mapper leaves images at full resolution.
"""

from typing import Dict, List, Optional

import detectron2.data.transforms as T
import numpy as np
from detectron2.structures import BoxMode
from pycocotools import mask as mask_util

from ..modeling.tiling import check_tile_config

__all__ = ["TileCrop", "visible_fractions", "tile_annotations", "annotation_boxes", "mapper_args"]


class TileCrop(T.Augmentation):
    """A ``size`` x ``size`` crop at full resolution resized by ``scale``, or (with probability
    ``whole_prob``, and always for an image that fits in one tile) the ``whole`` augmentation."""

    def __init__(
        self,
        size: int,
        scale: float,
        whole_prob: float,
        instance_prob: float,
        whole: T.Augmentation,
    ):
        """
        Args:
            size: crop side in pixels of the image.
            scale: resize of the crop.
            whole_prob: probability of using the whole image (``whole``) instead.
            instance_prob: probability that the crop holds the centre of a random box.
            whole: the whole-image augmentation (the usual ``ResizeShortestEdge``).
        """
        super().__init__()
        self.size, self.scale = size, scale
        self.whole_prob, self.instance_prob = whole_prob, instance_prob
        self.whole = whole

    def get_transform(self, image: np.ndarray, boxes: Optional[np.ndarray] = None):
        """
        Args:
            image: (H, W, C). boxes: (N, 4) XYXY of the image's instances, or None.
        """
        h, w = image.shape[:2]
        if (h <= self.size and w <= self.size) or np.random.rand() < self.whole_prob:
            return self.whole.get_transform(image)
        ch, cw = min(self.size, h), min(self.size, w)
        if boxes is not None and len(boxes) and np.random.rand() < self.instance_prob:
            box = boxes[np.random.randint(len(boxes))]
            cx = int(np.clip((box[0] + box[2]) / 2, 0, w - 1))
            cy = int(np.clip((box[1] + box[3]) / 2, 0, h - 1))
            # origins whose crop holds (cx, cy), within the image
            x0 = np.random.randint(max(0, cx - cw + 1), min(cx, w - cw) + 1)
            y0 = np.random.randint(max(0, cy - ch + 1), min(cy, h - ch) + 1)
        else:
            x0 = np.random.randint(w - cw + 1)
            y0 = np.random.randint(h - ch + 1)
        crop = T.CropTransform(int(x0), int(y0), cw, ch, orig_w=w, orig_h=h)
        if self.scale == 1:
            return crop
        out_h, out_w = max(1, round(ch * self.scale)), max(1, round(cw * self.scale))
        return T.TransformList([crop, T.ResizeTransform(ch, cw, out_h, out_w)])


def visible_fractions(boxes: np.ndarray, crop: np.ndarray) -> np.ndarray:
    """Share of each box inside a crop rectangle.

    Args:
        boxes: (N, 4) XYXY; crop: (4,) XYXY.
    Returns:
        (N,) in [0, 1]; an empty box counts as fully visible when inside, else 0.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(boxes[:, 2], crop[2]) - np.maximum(boxes[:, 0], crop[0]), 0, None)
    ih = np.clip(np.minimum(boxes[:, 3], crop[3]) - np.maximum(boxes[:, 1], crop[1]), 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (boxes[:, 0] >= crop[0]) & (boxes[:, 1] >= crop[1])
    inside &= (boxes[:, 2] <= crop[2]) & (boxes[:, 3] <= crop[3])
    return np.where(area > 0, iw * ih / np.maximum(area, 1e-9), inside.astype(np.float64))


def annotation_boxes(dataset_dict: Dict) -> np.ndarray:
    """(N, 4) XYXY boxes of the dict's non-crowd annotations (for :class:`TileCrop`)."""
    boxes = [
        BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
        for a in dataset_dict.get("annotations", [])
        if not a.get("iscrowd", 0) and "bbox" in a
    ]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def tile_annotations(dataset_dict: Dict, transforms, min_visible: float) -> None:
    """After a tile crop (nothing otherwise), in place: drop the annotations with less than
    ``min_visible`` of their box inside the crop (and always those wholly outside it), and turn
    the polygons of the others into RLE at the image's size, which detectron2 crops without
    shapely (its polygon crop needs it)."""
    crops = [
        t for t in getattr(transforms, "transforms", [transforms]) if isinstance(t, T.CropTransform)
    ]
    annos = dataset_dict.get("annotations")
    if not crops or not annos:
        return
    c = crops[0]
    window = np.array([c.x0, c.y0, c.x0 + c.w, c.y0 + c.h], dtype=np.float64)
    boxes = np.asarray(
        [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
        dtype=np.float64,
    )
    visible = visible_fractions(boxes, window)
    keep = (visible >= min_visible) & (visible > 0)
    h, w = dataset_dict.get("height", c.orig_h), dataset_dict.get("width", c.orig_w)
    kept = []
    for a, k in zip(annos, keep):
        if k:
            segm = a.get("segmentation")
            if isinstance(segm, list) and segm:
                a = dict(a, segmentation=_polygons_to_rle(segm, h, w))
            kept.append(a)
    dataset_dict["annotations"] = kept


def _polygons_to_rle(polygons: List, h: int, w: int) -> Dict:
    try:
        rle = mask_util.merge(mask_util.frPyObjects([list(map(float, p)) for p in polygons], h, w))
    except (TypeError, ValueError, IndexError):
        return polygons  # left to the mapper's checks, which name the annotation
    return rle


def mapper_args(cfg, is_train: bool, augmentations: List[T.Augmentation]) -> Dict:
    """The mapper arguments tiling changes (nothing when it is off): in training, the
    augmentations with :class:`TileCrop` around the resize, boxes recomputed from the clipped
    masks and ``tile_min_visible``; in inference, no resize (the model tiles the image itself).

    Raises:
        ValueError: a bad ``INPUT.TILE`` value, or ``INPUT.CROP`` on with tiled training.
    """
    t = cfg.INPUT.TILE
    if not (t.TRAIN if is_train else t.TEST):
        return {}
    check_tile_config(cfg)
    if not is_train:
        return {
            "augmentations": [a for a in augmentations if not isinstance(a, T.ResizeShortestEdge)]
        }
    if cfg.INPUT.CROP.ENABLED:
        raise ValueError("INPUT.TILE.TRAIN crops tiles itself: turn INPUT.CROP.ENABLED off")
    augs = [
        (
            TileCrop(t.SIZE, float(t.SCALE), t.WHOLE_IMAGE_PROB, t.INSTANCE_PROB, a)
            if isinstance(a, T.ResizeShortestEdge)
            else a
        )
        for a in augmentations
    ]
    return {"augmentations": augs, "recompute_boxes": True, "tile_min_visible": t.MIN_VISIBLE}
