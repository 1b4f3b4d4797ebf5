"""The detectron2 dataset dicts of a checked COCO or LVIS file, and the COCO dict of what passed.

The layout, defined here once (:mod:`solo_d2.data.packed` stores exactly these fields and gives
them back): per image ``file_name`` (under the image root), ``height``, ``width``, ``image_id`` and
``annotations``, each with ``id``, ``iscrowd``, ``bbox`` (XYWH), ``bbox_mode``, ``category_id``
(contiguous) and ``segmentation`` (polygons as lists of floats, an RLE compressed); LVIS images
also keep ``neg_category_ids`` and ``not_exhaustive_category_ids``. Panoptic dicts are
:mod:`solo_d2.data.panoptic`'s.
"""

import os
from typing import Any, Dict, List, Sequence

from detectron2.structures import BoxMode
from pycocotools import mask as mask_util

from .validation import CheckedCOCO, _is_number

__all__ = ["dict_segmentation", "to_dataset_dicts", "clean_coco_dict"]


def dict_segmentation(segm, h: int, w: int):
    """A checked segmentation as dataset dicts keep it: polygons as they are, an uncompressed
    RLE compressed (as detectron2's loader does)."""
    if isinstance(segm, dict) and isinstance(segm["counts"], list):
        return mask_util.frPyObjects(segm, h, w)
    return segm


def to_dataset_dicts(
    data: Dict[str, Any],
    checked: CheckedCOCO,
    image_root: str,
    image_lists: Sequence[str] = (),
) -> List[Dict[str, Any]]:
    """detectron2 dataset dicts of the images and annotations that passed, by image id order.

    Each annotation keeps its COCO ``id`` (so later messages can name it); ``category_id`` is
    the contiguous id. Each dict also gets a copy of its image's ``image_lists`` fields (LVIS's
    ``neg_category_ids`` and ``not_exhaustive_category_ids``).
    """
    images = {img["id"]: img for img in data["images"] if img["id"] not in checked.bad_images}
    per_image = {img_id: [] for img_id in images}
    for ann in data["annotations"]:
        if ann["id"] in checked.bad_annotations or ann["image_id"] not in per_image:
            continue
        img = images[ann["image_id"]]
        segm = checked.kept_polygons.get(ann["id"], ann["segmentation"])
        per_image[ann["image_id"]].append(
            {
                "id": ann["id"],
                "iscrowd": int(ann.get("iscrowd", 0)),
                "bbox": list(ann["bbox"]),
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": checked.id_map[ann["category_id"]],
                "segmentation": dict_segmentation(segm, img["height"], img["width"]),
            }
        )
    return [
        {
            "file_name": os.path.join(image_root, images[img_id]["file_name"]),
            "height": images[img_id]["height"],
            "width": images[img_id]["width"],
            "image_id": img_id,
            "annotations": per_image[img_id],
            **{key: list(images[img_id][key]) for key in image_lists},
        }
        for img_id in sorted(images)
    ]


def _pixel_area(segm, h: int, w: int) -> float:
    """Foreground pixels of a (checked) polygon list or RLE, as pycocotools rasterises it."""
    if isinstance(segm, list):
        rle = mask_util.merge(mask_util.frPyObjects(segm, h, w))
    elif isinstance(segm["counts"], list):
        rle = mask_util.frPyObjects(segm, h, w)
    else:
        counts = segm["counts"]
        rle = {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
    return float(mask_util.area(rle))


def clean_coco_dict(data: Dict[str, Any], checked: CheckedCOCO) -> Dict[str, Any]:
    """The COCO dict without the faulty images and annotations (partly bad polygons dropped).

    Annotations without "area" (or whose "area" is not a non-negative number) get their mask's
    pixel count (as pycocotools rasterises it) and those without "iscrowd" get 0: COCO's
    evaluation needs both (converters often omit them).
    """
    images = [img for img in data["images"] if img["id"] not in checked.bad_images]
    sizes = {img["id"]: (img["height"], img["width"]) for img in images}
    annotations = []
    for ann in data["annotations"]:
        if ann["id"] in checked.bad_annotations or ann["image_id"] not in sizes:
            continue
        if ann["id"] in checked.kept_polygons:
            ann = {**ann, "segmentation": checked.kept_polygons[ann["id"]]}
        if not (_is_number(ann.get("area")) and ann["area"] >= 0):
            ann = {**ann, "area": _pixel_area(ann["segmentation"], *sizes[ann["image_id"]])}
        if "iscrowd" not in ann:
            ann = {**ann, "iscrowd": 0}
        annotations.append(ann)
    return {**data, "images": images, "annotations": annotations}
