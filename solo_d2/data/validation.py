"""Checks of COCO instance-segmentation annotation files, and loading of the checked data.

A COCO file is checked in two tiers:

* **Errors** (:class:`DatasetError`, a ``ValueError``): the file cannot be used at all. It is not
  a COCO instances dict, an image entry lacks ``id`` / ``file_name`` / ``height`` / ``width``, two
  images (or annotations, or categories) share an id, an annotation has no ``id``, or there are
  no categories.
* **Faults** (:class:`DataFault`): one annotation or one image is unusable and is left out, the
  rest of the dataset is fine. Annotations: no / empty ``segmentation``, only polygons with fewer
  than 3 points (or odd length, or non-finite coordinates), an RLE whose ``size`` differs from its
  image or whose counts do not cover it, a zero-area mask, a missing or malformed ``bbox``
  (not 4 finite numbers, negative size), a box entirely outside its image, a ``category_id``
  absent from ``categories``, an ``image_id`` absent from ``images``. Images: the file does not
  exist under the image root. Partly invalid polygons (some of an annotation's polygons have
  fewer than 3 points) are dropped from the annotation, which is kept, and reported too.

Boxes partly outside the image are not faults (they are clipped, as in detectron2), nor are
images without annotations or with only crowd annotations (they are valid negatives).

:func:`load_checked_coco` returns detectron2 dataset dicts of what passed and the list of faults;
:func:`clean_coco_dict` gives the COCO dict of what passed (the evaluation ground truth).
"""

import itertools
import json
import logging
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.structures import BoxMode
from pycocotools import mask as mask_util

__all__ = [
    "DataFault",
    "DatasetError",
    "CheckedCOCO",
    "read_coco_json",
    "check_coco_dict",
    "load_checked_coco",
    "clean_coco_dict",
    "summarize_faults",
    "MAX_LISTED_FAULTS",
]

logger = logging.getLogger(__name__)

COCO_KEYS = ("images", "annotations", "categories")
MAX_LISTED_FAULTS = 10  # faults named one by one in a log message; all are kept in the list


class DatasetError(ValueError):
    """A dataset that cannot be used at all; the message names the file and the entry."""


@dataclass(frozen=True)
class DataFault:
    """One annotation or image left out of a dataset, and why.

    Attributes:
        kind: short machine-readable name, e.g. "empty_segmentation", "rle_size".
        message: what is wrong, in words.
        json_file: the annotation file.
        image_id, annotation_id: the COCO ids involved (None when not applicable).
        file_name: the image file name as written in the annotation file.
    """

    kind: str
    message: str
    json_file: str
    image_id: Optional[Any] = None
    annotation_id: Optional[Any] = None
    file_name: Optional[str] = None

    def __str__(self) -> str:
        where = []
        if self.annotation_id is not None:
            where.append(f"annotation id {self.annotation_id}")
        if self.image_id is not None:
            where.append(f"image id {self.image_id}")
        if self.file_name is not None:
            where.append(f"file {self.file_name}")
        return f"{', '.join(where) or self.json_file}: {self.message}"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class CheckedCOCO:
    """The outcome of :func:`check_coco_dict`.

    Attributes:
        thing_classes: category names, ordered by category id.
        id_map: COCO category id -> contiguous id in [0, len(thing_classes)).
        faults: every fault found, in file order (images first).
        bad_images: ids of the images left out.
        bad_annotations: ids of the annotations left out.
        kept_polygons: annotation id -> its usable polygons, for annotations that also had
            unusable ones.
        areas: annotation id -> mask area (polygons: shoelace; RLE: pixels), for the kept ones.
    """

    thing_classes: List[str]
    id_map: Dict[int, int]
    faults: List[DataFault]
    bad_images: set
    bad_annotations: set
    kept_polygons: Dict[Any, list]
    areas: Dict[Any, float]


def read_coco_json(json_file: str, what: str = "") -> Dict[str, Any]:
    """Load ``json_file`` and check that it is a COCO instances dict (top-level keys only).

    Args:
        what: extra context for error messages, e.g. "(dataset spec 'x=a.json:imgs')".
    Raises:
        DatasetError: not valid JSON, or not an object with "images", "annotations" and
            "categories" lists.
    """
    where = f"Annotation file {str(json_file)!r}" + (f" {what}" if what else "")
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise DatasetError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{where} is not a COCO instances file: its top level is not an object")
    for key in COCO_KEYS:
        if not isinstance(data.get(key), list):
            raise DatasetError(
                f"{where} is not a COCO instances file: key {key!r} is missing or not a list"
            )
    return data


# Exact type tests (JSON gives only these types; bool, a subclass of int, is not a number here).
def _is_int(x) -> bool:
    return type(x) is int


def _is_id(x) -> bool:
    """COCO ids are integers; strings are accepted too (some converters write them)."""
    return type(x) is int or type(x) is str


def _is_number(x) -> bool:
    return (type(x) is float or type(x) is int) and math.isfinite(x)


def _check_categories(categories: list, json_file: str) -> Tuple[List[str], Dict[int, int]]:
    if not categories:
        raise DatasetError(f"Annotation file {json_file!r} has no categories")
    seen = {}
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or "name" not in c:
            raise DatasetError(
                f"Annotation file {json_file!r}: categories[{i}] = {c!r} needs an integer 'id' "
                "and a 'name'"
            )
        if c["id"] in seen:
            raise DatasetError(
                f"Annotation file {json_file!r}: category id {c['id']} is used twice "
                f"({seen[c['id']]!r} and {c['name']!r})"
            )
        seen[c["id"]] = str(c["name"])
    ids = sorted(seen)
    return [seen[i] for i in ids], {cid: k for k, cid in enumerate(ids)}


def _check_images(images: list, json_file: str) -> Dict[Any, dict]:
    by_id = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            raise DatasetError(f"Annotation file {json_file!r}: images[{i}] is not an object")
        missing = [k for k in ("id", "file_name", "height", "width") if k not in img]
        if missing:
            raise DatasetError(
                f"Annotation file {json_file!r}: images[{i}] (id {img.get('id')!r}) has no "
                f"{', '.join(repr(k) for k in missing)}"
            )
        h, w = img["height"], img["width"]
        if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
            raise DatasetError(
                f"Annotation file {json_file!r}: image id {img['id']!r} ({img['file_name']}) has "
                f"height={h!r}, width={w!r}; both must be positive integers"
            )
        if not _is_id(img["id"]):
            raise DatasetError(
                f"Annotation file {json_file!r}: images[{i}] has id {img['id']!r}, not an integer"
            )
        if img["id"] in by_id:
            raise DatasetError(
                f"Annotation file {json_file!r}: image id {img['id']!r} is used twice, by "
                f"{by_id[img['id']]['file_name']!r} and {img['file_name']!r}; image ids must be "
                "unique"
            )
        by_id[img["id"]] = img
    return by_id


def _check_annotation_ids(annotations: list, json_file: str) -> None:
    seen = set()
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not _is_id(ann.get("id")):
            raise DatasetError(
                f"Annotation file {json_file!r}: annotations[{i}] has no integer 'id'"
            )
        if ann["id"] in seen:
            raise DatasetError(
                f"Annotation file {json_file!r}: annotation id {ann['id']!r} is used twice; "
                "annotation ids must be unique"
            )
        seen.add(ann["id"])


def _polygon_shape_problem(poly) -> Optional[str]:
    """Why ``poly`` cannot be a polygon, from its length and type alone, or None."""
    if not isinstance(poly, (list, tuple)):
        return f"a polygon is a {type(poly).__name__}, not a list of coordinates"
    if len(poly) % 2:
        return f"a polygon has an odd number of coordinates ({len(poly)})"
    if len(poly) < 6:
        return f"a polygon has {len(poly) // 2} point(s), fewer than 3"
    return None


def _polygon_checks(polygons: Sequence[Sequence]) -> Tuple[np.ndarray, np.ndarray]:
    """Vectorised over all polygons of a file: (P,) bool "finite numbers only", (P,) float64
    shoelace area (0 for the others). Every polygon has an even length of at least 6."""
    if not polygons:
        return np.zeros(0, dtype=bool), np.zeros(0)
    lengths = np.fromiter(map(len, polygons), dtype=np.int64, count=len(polygons))
    coords = itertools.chain.from_iterable(polygons)
    if set(map(type, coords)) <= {int, float}:
        values = np.fromiter(
            itertools.chain.from_iterable(polygons), np.float64, int(lengths.sum())
        )
    else:  # strings, bools, None ... somewhere: mark those polygons NaN
        values = np.concatenate(
            [
                np.asarray(p, np.float64) if all(type(v) in (int, float) for v in p)
                else np.full(len(p), np.nan)
                for p in polygons
            ]
        )  # fmt: skip
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    finite = np.isfinite(values)
    ok = np.logical_and.reduceat(finite, starts)
    xy = np.where(finite, values, 0.0).reshape(-1, 2)
    points, first = lengths // 2, starts // 2
    nxt = np.arange(len(xy)) + 1
    nxt[first + points - 1] = first  # each polygon's last point wraps to its first
    cross = xy[:, 0] * xy[nxt, 1] - xy[nxt, 0] * xy[:, 1]
    areas = 0.5 * np.abs(np.add.reduceat(cross, first))
    return ok, np.where(ok, areas, 0.0)


def _rle_problem(segm: dict, h: int, w: int) -> Tuple[Optional[str], Optional[float]]:
    """(why the RLE is unusable or None, its area when usable)."""
    size, counts = segm.get("size"), segm.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(_is_int, size))):
        return f"RLE 'size' is {size!r}, not [height, width]", None
    if list(size) != [h, w]:
        return f"RLE size {list(size)} differs from the image's [height, width] [{h}, {w}]", None
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts):
            return "uncompressed RLE counts are not non-negative integers", None
        if sum(counts) != h * w:
            return f"RLE counts cover {sum(counts)} pixels, the image has {h * w}", None
        return None, float(sum(counts[1::2]))
    if isinstance(counts, (str, bytes)):
        rle = {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
        try:
            return None, float(mask_util.area(rle))
        except Exception as e:  # pycocotools raises assorted errors on corrupt strings
            return f"compressed RLE counts cannot be decoded ({e})", None
    return f"RLE 'counts' is a {type(counts).__name__}, not a list or a string", None


def _annotation_problem(ann: dict, img: Optional[dict], id_map: dict) -> Optional[tuple]:
    """(kind, message) of the fault that makes ``ann`` unusable, or None."""
    if img is None:
        return "unknown_image", f"image_id {ann.get('image_id')!r} is not in 'images'"
    h, w = img["height"], img["width"]
    if not _is_int(ann.get("category_id")) or ann["category_id"] not in id_map:
        return (
            "unknown_category",
            f"category_id {ann.get('category_id')!r} is not in 'categories' (ids {sorted(id_map)})",
        )
    box = ann.get("bbox")
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(map(_is_number, box))):
        return "bad_bbox", f"bbox {box!r} is not 4 finite numbers [x, y, width, height]"
    x, y, bw, bh = box
    if bw < 0 or bh < 0:
        return "bad_bbox", f"bbox {list(box)} has a negative width or height"
    if x >= w or y >= h or x + bw <= 0 or y + bh <= 0:
        return "bbox_outside_image", f"bbox {list(box)} lies outside the {w}x{h} image"
    segm = ann.get("segmentation")
    if segm is None:
        return "no_segmentation", "has no 'segmentation' (SOLO needs a mask per instance)"
    if isinstance(segm, dict):
        problem, area = _rle_problem(segm, h, w)
        if problem is not None:
            return "bad_rle", problem
        if area == 0:
            return "zero_area_mask", "its RLE mask has no foreground pixel"
        return None
    if isinstance(segm, list):  # the polygons are checked together, in check_coco_dict
        if not segm:
            return "empty_segmentation", "'segmentation' is an empty list"
        return None
    return "bad_segmentation", f"'segmentation' is a {type(segm).__name__}, not polygons or RLE"


def check_coco_dict(
    data: Dict[str, Any], json_file: str, image_root: Optional[str] = None
) -> CheckedCOCO:
    """Check a COCO instances dict (see the module docstring for what is checked).

    Args:
        data: the loaded JSON (top-level keys already checked by :func:`read_coco_json`).
        json_file: its path, for messages.
        image_root: when given, images whose file is missing there are faults.
    Raises:
        DatasetError: the file cannot be used at all.
    """
    thing_classes, id_map = _check_categories(data["categories"], json_file)
    images = _check_images(data["images"], json_file)
    _check_annotation_ids(data["annotations"], json_file)

    faults: List[DataFault] = []
    bad_images, bad_annotations = set(), set()
    if image_root is not None:
        for img_id, img in images.items():
            path = os.path.join(image_root, img["file_name"])
            if not os.path.isfile(path):
                faults.append(
                    DataFault(
                        "missing_image_file",
                        f"image file {path} not found",
                        json_file,
                        image_id=img_id,
                        file_name=img["file_name"],
                    )
                )
                bad_images.add(img_id)

    annotation_faults = []  # (index in the file, fault)
    kept_polygons, areas = {}, {}
    pending, candidates = [], []  # polygon annotations; polygons of the right shape
    for i, ann in enumerate(data["annotations"]):
        img = images.get(ann.get("image_id")) if _is_id(ann.get("image_id")) else None
        file_name = img["file_name"] if img is not None else None
        problem = _annotation_problem(ann, img, id_map)
        if problem is not None:
            fault = DataFault(*problem, json_file, ann.get("image_id"), ann["id"], file_name)
            annotation_faults.append((i, fault))
            bad_annotations.add(ann["id"])
            continue
        segm = ann["segmentation"]
        if isinstance(segm, dict):
            areas[ann["id"]] = _rle_problem(segm, img["height"], img["width"])[1]
            continue
        entries = []  # (polygon, problem, index into candidates)
        for poly in segm:
            problem = _polygon_shape_problem(poly)
            entries.append((poly, problem, len(candidates) if problem is None else -1))
            if problem is None:
                candidates.append(poly)
        pending.append((i, ann, file_name, entries))

    finite, polygon_areas = _polygon_checks(candidates)
    for i, ann, file_name, entries in pending:
        good, problems, area = [], [], 0.0
        for poly, problem, k in entries:
            if problem is None and not finite[k]:
                problem = "a polygon has non-numeric or non-finite coordinates"
            if problem is None:
                good.append(poly)
                area += float(polygon_areas[k])
            else:
                problems.append(problem)

        def fault(kind: str, message: str, ann=ann, file_name=file_name, i=i) -> None:
            annotation_faults.append(
                (i, DataFault(kind, message, json_file, ann["image_id"], ann["id"], file_name))
            )

        if not good:
            fault("bad_polygons", f"no usable polygon: {problems[0]}")
        elif area == 0:
            fault("zero_area_mask", "its polygons enclose no area")
        else:
            areas[ann["id"]] = area
            if problems:
                message = f"{len(problems)} of {len(entries)} polygons dropped ({problems[0]})"
                fault("dropped_polygons", message)
                kept_polygons[ann["id"]] = good
            continue
        bad_annotations.add(ann["id"])
    annotation_faults.sort(key=lambda item: item[0])
    faults += [fault for _, fault in annotation_faults]
    areas = {k: v for k, v in areas.items() if k not in bad_annotations}
    return CheckedCOCO(
        thing_classes, id_map, faults, bad_images, bad_annotations, kept_polygons, areas
    )


def _segmentation(segm, h: int, w: int):
    """Polygons as they are; an uncompressed RLE compressed (as detectron2's loader does)."""
    if isinstance(segm, dict) and isinstance(segm["counts"], list):
        return mask_util.frPyObjects(segm, h, w)
    return segm


def to_dataset_dicts(
    data: Dict[str, Any], checked: CheckedCOCO, image_root: str
) -> List[Dict[str, Any]]:
    """detectron2 dataset dicts of the images and annotations that passed, by image id order.

    Each annotation keeps its COCO ``id`` (so later messages can name it); ``category_id`` is
    the contiguous id.
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
                "segmentation": _segmentation(segm, img["height"], img["width"]),
            }
        )
    return [
        {
            "file_name": os.path.join(image_root, images[img_id]["file_name"]),
            "height": images[img_id]["height"],
            "width": images[img_id]["width"],
            "image_id": img_id,
            "annotations": per_image[img_id],
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

    Annotations without "area" get their mask's pixel count (as pycocotools rasterises it) and
    those without "iscrowd" get 0: COCO's evaluation needs both (converters often omit them).
    """
    images = [img for img in data["images"] if img["id"] not in checked.bad_images]
    sizes = {img["id"]: (img["height"], img["width"]) for img in images}
    annotations = []
    for ann in data["annotations"]:
        if ann["id"] in checked.bad_annotations or ann["image_id"] not in sizes:
            continue
        if ann["id"] in checked.kept_polygons:
            ann = {**ann, "segmentation": checked.kept_polygons[ann["id"]]}
        if "area" not in ann:
            ann = {**ann, "area": _pixel_area(ann["segmentation"], *sizes[ann["image_id"]])}
        if "iscrowd" not in ann:
            ann = {**ann, "iscrowd": 0}
        annotations.append(ann)
    return {**data, "images": images, "annotations": annotations}


def load_checked_coco(
    json_file: str, image_root: str, what: str = ""
) -> Tuple[Dict[str, Any], CheckedCOCO, List[Dict[str, Any]]]:
    """Read, check and convert a COCO file: (raw dict, check outcome, dataset dicts).

    Raises:
        DatasetError: the file cannot be used at all.
    """
    data = read_coco_json(json_file, what)
    checked = check_coco_dict(data, json_file, image_root)
    return data, checked, to_dataset_dicts(data, checked, image_root)


def summarize_faults(faults: Sequence[DataFault], limit: int = MAX_LISTED_FAULTS) -> str:
    """Counts by kind and the first ``limit`` faults by name, one per line."""
    kinds = Counter(f.kind for f in faults)
    lines = [", ".join(f"{n} {kind}" for kind, n in kinds.most_common())]
    lines += [f"  {f}" for f in faults[:limit]]
    if len(faults) > limit:
        lines.append(f"  ... and {len(faults) - limit} more")
    return "\n".join(lines)
