"""LVIS-format datasets from the command line: ``--dataset NAME=lvis:ANNOTATIONS.json:IMAGE_DIR``.

LVIS (Gupta et al., CVPR 2019, https://www.lvisdataset.org) annotation files are COCO-like, with
a few additions this module keeps:

* categories carry ``frequency`` ("r" rare: 1-10 training images, "c" common: 11-100, "f"
  frequent: more than 100) and ``image_count``; their ids need not be contiguous (they are mapped
  to 0..C-1 by increasing id, as for COCO data);
* images carry ``neg_category_ids`` (categories verified absent from the image) and
  ``not_exhaustive_category_ids`` (categories whose instances are not all annotated); both are
  kept in each dataset dict under those keys, as the file's category ids (as detectron2's
  ``load_lvis_json`` keeps them), and default to ``[]``;
* LVIS v1 images have no ``file_name``, only a ``coco_url``
  (``http://images.cocodataset.org/train2017/000000391895.jpg``): an image is found as
  ``IMAGE_DIR/file_name``, else as ``IMAGE_DIR/<last component of coco_url>``, else (when only
  that exists) as ``IMAGE_DIR/<split folder>/<file>`` from the last two components, so
  ``IMAGE_DIR`` may be a split folder or the COCO root holding ``train2017/`` and ``val2017/``.

The annotations and images get the same checks, faults and messages as COCO data
(:mod:`solo_d2.data.validation`); LVIS's own fields are checked too (a category without a valid
``frequency``, negative/not-exhaustive lists that are not lists of known category ids: errors).

The metadata gets ``evaluator_type="lvis"`` (:class:`~solo_d2.evaluation.SOLOLVISEvaluator`
evaluates it with LVIS's federated rules), ``thing_classes``,
``thing_dataset_id_to_contiguous_id``, ``json_file``, ``image_root``, its
:class:`~solo_d2.data.record.DatasetRecord` (kind "lvis", the faults, the check key),
``class_frequency`` ("r" / "c" / "f" per contiguous class) and ``class_image_count`` (detectron2's
format for its builtin ``lvis_v1_*`` datasets: ``[{"id": category id, "image_count": n}]``, the
file's ``image_count`` or, where absent, the images annotated with the category in this file).

detectron2's builtin ``lvis_v1_*`` / ``lvis_v0.5_*`` datasets (under ``$DETECTRON2_DATASETS``)
need nothing from here: their dicts (detectron2's loader) go through the SOLO mapper and their
``evaluator_type`` is "lvis" already.
"""

import os
from typing import Any, Dict, List, Optional, Tuple

from ..config.defaults import DEFAULT_MAX_IMAGE_PIXELS
from .check_cache import read_and_check
from .coco import InstanceFormat, register_instance_dataset
from .faults import DatasetError
from .specs import LVIS_SPEC_FORM, parse_dataset_spec
from .validation import CheckedCOCO, check_coco_dict

__all__ = [
    "LVIS_SPEC_FORM",
    "LVIS_FORMAT",
    "FREQUENCIES",
    "IMAGE_CATEGORY_LISTS",
    "parse_lvis_spec",
    "adapt_lvis_dict",
    "read_and_check_lvis",
    "register_lvis_dataset",
]

FREQUENCIES = ("r", "c", "f")  # rare, common, frequent (LVIS's order, and APr / APc / APf's)
IMAGE_CATEGORY_LISTS = ("neg_category_ids", "not_exhaustive_category_ids")


def parse_lvis_spec(spec: str) -> Tuple[str, str, str]:
    """Split ``NAME=lvis:ANNOTATIONS.json:IMAGE_DIR`` into ``(name, json_file, image_dir)``.

    The annotation path may contain ``:`` (the image dir starts after the last one).
    """
    return parse_dataset_spec(spec, "lvis:", LVIS_SPEC_FORM)


def _image_file_name(img: dict, image_root: str) -> Any:
    """The image's file name under ``image_root`` (see the module docstring), or None."""
    name = img.get("file_name")
    if isinstance(name, str) and name:
        return name
    url = img.get("coco_url")
    if not (isinstance(url, str) and url.strip("/")):
        return None
    parts = url.rstrip("/").split("/")
    if len(parts) >= 2 and image_root is not None:
        in_split = os.path.join(parts[-2], parts[-1])
        if not os.path.isfile(os.path.join(image_root, parts[-1])) and os.path.isfile(
            os.path.join(image_root, in_split)
        ):
            return in_split
    return parts[-1]


def adapt_lvis_dict(data: Dict[str, Any], json_file: str, image_root: str = None) -> Dict[str, Any]:
    """The LVIS dict as :func:`~solo_d2.data.validation.check_coco_dict` reads COCO: every image
    gets a ``file_name`` (from ``coco_url`` when it has none; the others are left to the COCO
    checks) and the two per-image category lists (``[]`` when absent). ``data`` is not changed.

    Raises:
        DatasetError: an image has neither ``file_name`` nor ``coco_url``.
    """
    images = []
    for i, img in enumerate(data["images"]):
        if isinstance(img, dict):
            name = _image_file_name(img, image_root)
            if name is None and "file_name" not in img:
                raise DatasetError(
                    f"Annotation file {json_file!r}: images[{i}] (id {img.get('id')!r}) has "
                    "neither a 'file_name' nor a 'coco_url' to find its image file by"
                )
            img = {**img, "file_name": img["file_name"] if name is None else name}
            for key in IMAGE_CATEGORY_LISTS:
                img.setdefault(key, [])
        images.append(img)
    return {**data, "images": images}


def _check_lvis_fields(data: Dict[str, Any], checked: CheckedCOCO, json_file: str) -> None:
    """LVIS's own fields: categories' ``frequency`` and ``image_count``, images' category lists.

    Raises:
        DatasetError: one line naming the file and the entry.
    """
    for c in data["categories"]:
        freq = c.get("frequency")
        if freq not in FREQUENCIES:
            raise DatasetError(
                f"Annotation file {json_file!r}: category id {c['id']} ({c['name']!r}) has "
                f"frequency {freq!r}; LVIS categories need a 'frequency' of 'r' (rare), 'c' "
                "(common) or 'f' (frequent)"
            )
        count = c.get("image_count")
        if count is not None and not (type(count) is int and count >= 0):
            raise DatasetError(
                f"Annotation file {json_file!r}: category id {c['id']} ({c['name']!r}) has "
                f"image_count {count!r}, not a non-negative integer"
            )
    known = checked.id_map
    for img in data["images"]:
        for key in IMAGE_CATEGORY_LISTS:
            ids = img[key]
            if not (isinstance(ids, list) and all(type(k) is int for k in ids)):
                raise DatasetError(
                    f"Annotation file {json_file!r}: image id {img['id']!r} has {key} "
                    f"{str(ids)[:60]}, not a list of category ids"
                )
            unknown = sorted(set(k for k in ids if k not in known))
            if unknown:
                raise DatasetError(
                    f"Annotation file {json_file!r}: image id {img['id']!r} lists category ids "
                    f"{unknown[:5]} in {key}, which are not in 'categories'"
                )


def read_and_check_lvis(
    json_file: str,
    image_root: str,
    max_image_pixels: Optional[int] = None,
    what: str = "",
    need_data: bool = True,
    with_faults: bool = True,
) -> Tuple[Optional[Dict[str, Any]], CheckedCOCO, Dict[str, Any]]:
    """Read, adapt and check an LVIS file, once per file content
    (:func:`~solo_d2.data.check_cache.read_and_check`): (adapted dict or None without
    ``need_data``, check outcome, ``{"class_frequency": ..., "class_image_count": ...}``).

    Raises:
        DatasetError: the file cannot be used at all.
    """

    def check(data):
        checked = check_coco_dict(data, json_file, image_root, max_image_pixels)
        _check_lvis_fields(data, checked, json_file)
        frequency, image_counts = _class_info(data, checked)
        return checked, {"class_frequency": frequency, "class_image_count": image_counts}

    return read_and_check(
        json_file,
        image_root,
        max_image_pixels,
        what,
        kind="lvis",
        prepare=lambda data: adapt_lvis_dict(data, json_file, image_root),
        check=check,
        need_data=need_data,
        with_faults=with_faults,
    )


def _class_info(data: Dict[str, Any], checked: CheckedCOCO) -> Tuple[List[str], List[dict]]:
    """``class_frequency`` and ``class_image_count`` (see the module docstring)."""
    annotated: Dict[int, set] = {}
    for ann in data["annotations"]:
        if ann["id"] not in checked.bad_annotations:
            annotated.setdefault(ann["category_id"], set()).add(ann["image_id"])
    by_id = {c["id"]: c for c in data["categories"]}
    ids = sorted(checked.id_map, key=checked.id_map.get)
    frequency = [by_id[i]["frequency"] for i in ids]
    counts = [
        {
            "id": i,
            "image_count": (
                by_id[i].get("image_count")
                if by_id[i].get("image_count") is not None
                else len(annotated.get(i, ()))
            ),
        }
        for i in ids
    ]
    return frequency, counts


LVIS_FORMAT = InstanceFormat(
    "lvis", "lvis:", LVIS_SPEC_FORM, read_and_check_lvis, IMAGE_CATEGORY_LISTS
)


def register_lvis_dataset(spec: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str:
    """Check and register the LVIS-format dataset of ``spec`` (:data:`LVIS_SPEC_FORM`); return
    its name: :func:`~solo_d2.data.coco.register_instance_dataset` of :data:`LVIS_FORMAT` (the
    same checks, errors, fault reports, pack and re-registration rules as COCO data)."""
    return register_instance_dataset(LVIS_FORMAT, spec, max_image_pixels)
