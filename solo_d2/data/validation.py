"""Checks of COCO instance-segmentation annotation files.

A COCO file is checked in two tiers:

* **Errors** (:class:`DatasetError`, a ``ValueError``): the file cannot be used at all. It is not
  a COCO instances dict, an image entry lacks ``id`` / ``file_name`` / ``height`` / ``width``,
  declares more pixels than ``INPUT.MAX_IMAGE_PIXELS`` (when a limit is given), two images (or
  annotations, or categories) share an id, an annotation has no ``id``, or there are no
  categories.
* **Faults** (:class:`DataFault`): one annotation or one image is unusable and is left out, the
  rest of the dataset is fine. Annotations: no / empty ``segmentation``, only polygons with fewer
  than 3 points (or odd length, or non-finite or absurd coordinates), polygons too large to
  rasterise safely (more than ``MAX_POLYGON_POINTS`` points, or an outline longer than
  ``MAX_POLYGON_OUTLINE`` pixels), an RLE whose ``size`` differs from its image, whose counts do
  not cover it or cannot be decoded, or that has more than ``MAX_RLE_RUNS`` runs, a zero-area
  mask, a missing or malformed ``bbox`` (not 4 finite numbers, negative size), a box entirely
  outside its image, an ``iscrowd`` other than 0 or 1, a ``category_id`` absent from
  ``categories``, an ``image_id`` absent from ``images``. Images: the file does not exist under
  the image root. Partly invalid polygons (some of an annotation's polygons have fewer than 3
  points) are dropped from the annotation, which is kept, and reported too.

Boxes partly outside the image are not faults (they are clipped, as in detectron2), nor are
images without annotations or with only crowd annotations (they are valid negatives).

Memory stays proportional to the file's size, however hostile its content: :func:`read_coco_json`
(:mod:`solo_d2.data.json_reader`) keeps only a count of the numbers of a JSON array past
``MAX_JSON_NUMBERS`` numbers in one object (a polygon of 10^7 points costs 8 bytes a number while
it is read, then nothing); values quoted in
messages are shortened; all faults are kept, but only the first ``MAX_DESCRIBED_FAULTS`` with
their message (the others with their kind and ids).

What the checks report is :mod:`solo_d2.data.faults`'; reading a file and checking it once per
content is :mod:`solo_d2.data.check_cache`'s (:func:`~solo_d2.data.check_cache.read_and_check`);
the dataset dicts of what passed, and its COCO dict (the evaluation ground truth), are
:mod:`solo_d2.data.dataset_dicts`'.
"""

import array
import collections
import functools
import itertools
import logging
import math
import os
import reprlib
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .faults import DataFault, DatasetError, faults_from_columns, faults_to_columns
from .json_reader import MAX_JSON_NUMBERS, LongArray, read_json

__all__ = [
    "CheckedCOCO",
    "read_coco_json",
    "check_coco_dict",
    "files_exist",
    "MAX_DESCRIBED_FAULTS",
    "MAX_POLYGON_POINTS",
    "MAX_POLYGON_OUTLINE",
    "MAX_RLE_RUNS",
    "MAX_JSON_NUMBERS",
]

logger = logging.getLogger(__name__)

COCO_KEYS = ("images", "annotations", "categories")
# Faults kept with their message; the later ones keep their kind and ids (80 bytes each).
MAX_DESCRIBED_FAULTS = 1000
# Polygon points of one annotation (all its polygons). Rasterising costs memory and time in
# proportion to the points and to the outline (pycocotools walks it at 5x resolution, ~40 bytes a
# pixel): an outline of MAX_POLYGON_OUTLINE pixels (sum over edges of max(|dx|, |dy|)) ~ 40 MB.
MAX_POLYGON_POINTS = 100_000
MAX_POLYGON_OUTLINE = 1_000_000
MAX_COORDINATE = 1e8  # |x|, |y| of a polygon point; pycocotools' int32 arithmetic overflows beyond
MAX_RLE_RUNS = 1_000_000  # runs of an RLE (entries of "counts", characters of a compressed one)

_short = reprlib.Repr()  # values quoted in messages: at most ~100 characters
_short.maxstring = _short.maxother = 40
_short.maxlist = _short.maxtuple = _short.maxdict = 6
_short.maxlevel = 2
_NUMBER_TYPES = frozenset((int, float))  # bool is not a number, nor an id, in a COCO file
_ID_TYPES = frozenset((int, str))
_SCREEN_CHUNK = 1 << 16  # annotations whose polygons the screen takes at once


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
        num_images, num_annotations: the file's images and annotations, good and bad.
        num_faults: ``len(faults)``, also when the faults were not loaded (``faults`` None).
        key: the check's key in :mod:`~solo_d2.data.check_cache` (it changes with the file's
            content), set by :func:`read_and_check`.
    """

    thing_classes: List[str]
    id_map: Dict[int, int]
    faults: Optional[List[DataFault]]
    bad_images: set
    bad_annotations: set
    kept_polygons: Dict[Any, list]
    num_images: int = 0
    num_annotations: int = 0
    num_faults: int = 0
    key: str = ""

    def to_json(self) -> Dict[str, Any]:
        """A JSON-serialisable form (ids keep their type: int or str); see :meth:`from_json`."""
        return {
            "thing_classes": self.thing_classes,
            "id_map": list(self.id_map.items()),
            "faults": faults_to_columns(self.faults),
            "bad_images": list(self.bad_images),
            "bad_annotations": list(self.bad_annotations),
            "kept_polygons": list(self.kept_polygons.items()),
            "num_images": self.num_images,
            "num_annotations": self.num_annotations,
        }

    @classmethod
    def from_json(cls, obj: Dict[str, Any], with_faults: bool = True) -> "CheckedCOCO":
        """The outcome :meth:`to_json` gave; ``faults`` None unless ``with_faults``."""
        return cls(
            thing_classes=obj["thing_classes"],
            id_map=dict(obj["id_map"]),
            faults=faults_from_columns(obj["faults"]) if with_faults else None,
            bad_images=set(obj["bad_images"]),
            bad_annotations=set(obj["bad_annotations"]),
            kept_polygons=dict(obj["kept_polygons"]),
            num_images=obj["num_images"],
            num_annotations=obj["num_annotations"],
            num_faults=len(obj["faults"]["kind"]),
        )


def read_coco_json(json_file: str, what: str = "") -> Dict[str, Any]:
    """Load ``json_file`` and check that it is a COCO instances dict (top-level keys only).

    An array holding more than ``MAX_JSON_NUMBERS`` numbers in one object is not kept: it is
    replaced by a placeholder that the checks report (e.g. a polygon of 10^7 points).

    Args:
        what: extra context for error messages, e.g. "(dataset spec 'x=a.json:imgs')".
    Raises:
        DatasetError: not valid JSON, or not an object with "images", "annotations" and
            "categories" lists.
    """
    where = f"Annotation file {str(json_file)!r}" + (f" {what}" if what else "")
    try:
        data = read_json(json_file)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise DatasetError(f"{where} is not valid JSON: {e}") from e
    except RecursionError:
        raise DatasetError(f"{where} nests arrays or objects too deeply to be read") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{where} is not a COCO instances file: its top level is not an object")
    for key in COCO_KEYS:
        if isinstance(data.get(key), LongArray):
            raise DatasetError(
                f"{where} is not a COCO instances file: {key!r} is an array of "
                f"{data[key].items} items holding more than {MAX_JSON_NUMBERS} numbers outside "
                "objects"
            )
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


LISTED_FOLDER_FILES = 1000
"""A folder that this many checked paths or more are in is listed once (``os.scandir``) instead
of a ``stat`` per path: COCO train2017's 118,287 images are one listing of ~0.05 s against
~0.4 s of stats (~3.4 us a stat, ~0.4 us a listed entry, on a 2-core EPYC). Fewer paths are
stat'ed (a few ms at most), so a small dataset in a huge folder does not list it."""


def files_exist(root: str, names: Sequence[str]) -> List[bool]:
    """Whether each ``os.path.join(root, name)`` is a file, as ``os.path.isfile`` says (links
    followed), folders of many of them listed once (:data:`LISTED_FOLDER_FILES`)."""
    sep, alt = os.sep, os.altsep or os.sep
    located = [  # (folder, name in it); plain names, the common case, are not joined and split
        (root, name) if name and sep not in name and alt not in name else _split(root, name)
        for name in names
    ]
    listed = {}
    for folder, count in collections.Counter(folder for folder, _ in located).items():
        if count >= LISTED_FOLDER_FILES:
            try:
                with os.scandir(folder) as entries:
                    listed[folder] = {e.name for e in entries if e.is_file()}
            except OSError:
                listed[folder] = set()
    return [
        base in listed[folder] if folder in listed else os.path.isfile(os.path.join(folder, base))
        for folder, base in located
    ]


def _split(root: str, name: str) -> Tuple[str, str]:
    return os.path.split(os.path.join(root, name))


def _check_categories(categories: list, json_file: str) -> Tuple[List[str], Dict[int, int]]:
    if not categories:
        raise DatasetError(f"Annotation file {json_file!r} has no categories")
    seen = {}
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or "name" not in c:
            raise DatasetError(
                f"Annotation file {json_file!r}: categories[{i}] = {_short.repr(c)} needs an "
                "integer 'id' and a 'name'"
            )
        if c["id"] in seen:
            raise DatasetError(
                f"Annotation file {json_file!r}: category id {c['id']} is used twice "
                f"({_short.repr(seen[c['id']])} and {_short.repr(str(c['name']))})"
            )
        seen[c["id"]] = str(c["name"])
    ids = sorted(seen)
    return [seen[i] for i in ids], {cid: k for k, cid in enumerate(ids)}


def _check_images(images: list, json_file: str, max_pixels: Optional[int]) -> Dict[Any, dict]:
    by_id = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            raise DatasetError(f"Annotation file {json_file!r}: images[{i}] is not an object")
        missing = [k for k in ("id", "file_name", "height", "width") if k not in img]
        if missing:
            raise DatasetError(
                f"Annotation file {json_file!r}: images[{i}] (id {_short.repr(img.get('id'))}) "
                f"has no {', '.join(repr(k) for k in missing)}"
            )
        name = img["file_name"]
        if not (isinstance(name, str) and name):
            raise DatasetError(
                f"Annotation file {json_file!r}: images[{i}] has file_name {_short.repr(name)}, "
                "not a file name"
            )
        h, w = img["height"], img["width"]
        if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
            raise DatasetError(
                f"Annotation file {json_file!r}: image id {_short.repr(img['id'])} ({name}) has "
                f"height={_short.repr(h)}, width={_short.repr(w)}; both must be positive integers"
            )
        if max_pixels is not None and h * w > max_pixels:
            raise DatasetError(
                f"Annotation file {json_file!r}: image id {_short.repr(img['id'])} ({name}) "
                f"declares height={h}, width={w}: {h * w} pixels, more than "
                f"INPUT.MAX_IMAGE_PIXELS = {max_pixels} (raise it if the image is genuine)"
            )
        if not _is_id(img["id"]):
            raise DatasetError(
                f"Annotation file {json_file!r}: images[{i}] has id {_short.repr(img['id'])}, not "
                "an integer"
            )
        if img["id"] in by_id:
            raise DatasetError(
                f"Annotation file {json_file!r}: image id {img['id']!r} is used twice, by "
                f"{by_id[img['id']]['file_name']!r} and {name!r}; image ids must be unique"
            )
        by_id[img["id"]] = img
    return by_id


def _check_annotation_ids(annotations: list, json_file: str) -> None:
    if set(map(type, annotations)) <= {dict}:  # the usual case, at C speed
        ids = [a.get("id") for a in annotations]
        if set(map(type, ids)) <= _ID_TYPES and len(set(ids)) == len(ids):
            return
    seen = set()  # find the first offender, for the message
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not _is_id(ann.get("id")):
            raise DatasetError(
                f"Annotation file {json_file!r}: annotations[{i}] has no integer 'id'"
            )
        if ann["id"] in seen:
            raise DatasetError(
                f"Annotation file {json_file!r}: annotation id {_short.repr(ann['id'])} is used "
                "twice; annotation ids must be unique"
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


def _polygon_checks(polygons: Sequence[Sequence]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised over all polygons of a file: (P,) bool "numbers within +-MAX_COORDINATE only",
    (P,) float64 shoelace area and (P,) float64 outline length (sum over edges of
    max(|dx|, |dy|)), both 0 for the others. Every polygon has an even length of at least 6."""
    if not polygons:
        return np.zeros(0, dtype=bool), np.zeros(0), np.zeros(0)
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
    usable = np.abs(values) <= MAX_COORDINATE  # False for NaN and infinities
    ok = np.logical_and.reduceat(usable, starts)
    xy = np.where(usable, values, 0.0).reshape(-1, 2)
    points, first = lengths // 2, starts // 2
    nxt = np.arange(len(xy)) + 1
    nxt[first + points - 1] = first  # each polygon's last point wraps to its first
    cross = xy[:, 0] * xy[nxt, 1] - xy[nxt, 0] * xy[:, 1]
    areas = 0.5 * np.abs(np.add.reduceat(cross, first))
    outlines = np.add.reduceat(np.abs(xy[nxt] - xy).max(axis=1), first)
    return ok, np.where(ok, areas, 0.0), np.where(ok, outlines, 0.0)


def _positions(values: list, table: dict, types: frozenset) -> np.ndarray:
    """(N,) int64: ``table[v]`` for each value of one of ``types`` found in ``table``, else -1."""
    n = len(values)
    if set(map(type, values)) <= types:
        return np.fromiter((table.get(v, -1) for v in values), np.int64, n)
    return np.fromiter((table.get(v, -1) if type(v) in types else -1 for v in values), np.int64, n)


def _number_rows(rows: list, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """(N,) bool "the row is a list of ``width`` int / float numbers" and (N, width) float64 of
    those rows (0 in the others)."""
    n = len(rows)
    values = np.zeros((n, width))
    try:
        if set(map(type, rows)) <= {list} and set(map(len, rows)) <= {width}:
            if set(map(type, itertools.chain.from_iterable(rows))) <= _NUMBER_TYPES:
                flat = itertools.chain.from_iterable(rows)
                values.reshape(-1)[:] = np.fromiter(flat, np.float64, n * width)
                return np.ones(n, dtype=bool), values
        ok = np.fromiter(
            (
                type(r) is list and len(r) == width and all(type(v) in _NUMBER_TYPES for v in r)
                for r in rows
            ),
            bool,
            n,
        )
        if ok.any():
            values[ok] = np.array([rows[i] for i in np.flatnonzero(ok).tolist()], np.float64)
    except OverflowError:  # integers beyond float64: left to the exact checks
        return np.zeros(n, dtype=bool), values
    return ok, values


def _clean_polygons(segmentations: list) -> np.ndarray:
    """(N,) bool: the segmentation is a non-empty list of polygons that all pass (lists of an
    even number, at least 6, of coordinates within +-MAX_COORDINATE) with at most
    MAX_POLYGON_POINTS points and MAX_POLYGON_OUTLINE pixels of outline in all, enclosing some
    area. False for RLEs and for whatever else :func:`check_coco_dict` must look at closely.
    ``_SCREEN_CHUNK`` annotations at a time (the arrays of a chunk's coordinates are temporary)."""
    chunks = range(0, len(segmentations), _SCREEN_CHUNK)
    parts = [_clean_polygons_chunk(segmentations[i : i + _SCREEN_CHUNK]) for i in chunks]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def _clean_polygons_chunk(segmentations: list) -> np.ndarray:
    n = len(segmentations)
    clean = np.zeros(n, dtype=bool)
    is_list = np.fromiter((type(s) is list and len(s) > 0 for s in segmentations), bool, n)
    rows = np.flatnonzero(is_list)
    if not len(rows):
        return clean
    lists = [segmentations[i] for i in rows.tolist()]
    counts = np.fromiter(map(len, lists), np.int64, len(lists))
    polygons = list(itertools.chain.from_iterable(lists))
    shaped = np.fromiter(
        (type(p) is list and len(p) >= 6 and not len(p) % 2 for p in polygons), bool, len(polygons)
    )
    whole = np.logical_and.reduceat(shaped, np.cumsum(counts) - counts)  # all polygons shaped
    polygons = list(itertools.compress(polygons, np.repeat(whole, counts).tolist()))
    rows, counts = rows[whole], counts[whole]
    if not len(rows):
        return clean
    usable, areas, outlines = _polygon_checks(polygons)
    points = np.fromiter(map(len, polygons), np.int64, len(polygons)) // 2
    starts = np.cumsum(counts) - counts
    clean[rows] = (
        np.logical_and.reduceat(usable, starts)
        & (np.add.reduceat(areas, starts) > 0)
        & (np.add.reduceat(outlines, starts) <= MAX_POLYGON_OUTLINE)
        & (np.add.reduceat(points, starts) <= MAX_POLYGON_POINTS)
    )
    return clean


def _clean_annotations(annotations: list, images: Dict[Any, dict], id_map: dict) -> np.ndarray:
    """(N,) bool: the annotation certainly has no fault (a non-crowd or crowd annotation with
    polygons, a known image and category, a usable box). Vectorised over the file; the others
    (RLEs among them) are checked one by one by :func:`check_coco_dict`."""
    n = len(annotations)
    index = {img_id: k for k, img_id in enumerate(images)}
    sizes = np.array([(img["height"], img["width"]) for img in images.values()], np.float64)
    image = _positions([a.get("image_id") for a in annotations], index, _ID_TYPES)
    category = _positions([a.get("category_id") for a in annotations], id_map, frozenset((int,)))
    boxed, box = _number_rows([a.get("bbox") for a in annotations], 4)
    crowd = np.fromiter(
        (type(c) is int and (c == 0 or c == 1) for c in (a.get("iscrowd", 0) for a in annotations)),
        bool,
        n,
    )
    h, w = sizes[np.maximum(image, 0)].T if len(sizes) else (np.zeros(n), np.zeros(n))
    x, y, bw, bh = box.T
    with np.errstate(invalid="ignore", over="ignore"):
        box_ok = (
            boxed
            & np.isfinite(box).all(axis=1)
            & (bw >= 0)
            & (bh >= 0)
            & (x < w)
            & (y < h)
            & (x + bw > 0)
            & (y + bh > 0)
        )
    clean = (image >= 0) & (category >= 0) & box_ok & crowd
    return clean & _clean_polygons([a.get("segmentation") for a in annotations])


def _rle_string_runs(counts: bytes) -> Optional[np.ndarray]:
    """The run lengths of a compressed COCO RLE, decoded as pycocotools' ``rleFrString`` does
    (values of 5-bit groups, each run after the second a delta to the run two before), or None
    when ``counts`` is not one: a character outside '0'..'o', an unfinished or over-long value, a
    run that is negative or does not fit in 32 bits. Vectorised: pycocotools does not check that
    the runs cover the image (decoding then fails, or writes past the mask)."""
    c = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    more = (c & 0x20) != 0
    if c.min() < 0 or c.max() > 63 or more[-1]:
        return None
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 7:  # over 35 bits
        return None
    shifts = 5 * (np.arange(c.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((c & 0x1F) << shifts, starts)
    values -= np.where(c[ends] & 0x10, np.left_shift(1, 5 * lengths), 0)  # negative values
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    if runs.min() < 0 or runs.max() >= 2**32:
        return None
    return runs


def _rle_problem(segm: dict, h: int, w: int) -> Tuple[Optional[str], Optional[float]]:
    """(why the RLE is unusable or None, its area when usable)."""
    size, counts = segm.get("size"), segm.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(_is_int, size))):
        return f"RLE 'size' is {_short.repr(size)}, not [height, width]", None
    if list(size) != [h, w]:
        return f"RLE size {list(size)} differs from the image's [height, width] [{h}, {w}]", None
    if isinstance(counts, LongArray) or (
        isinstance(counts, (list, str, bytes)) and len(counts) > MAX_RLE_RUNS
    ):
        n = counts.items if isinstance(counts, LongArray) else len(counts)
        return f"RLE 'counts' has {n} entries, more than the {MAX_RLE_RUNS} allowed", None
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts):
            return "uncompressed RLE counts are not non-negative integers", None
        covered, area = sum(counts), sum(counts[1::2])
    elif isinstance(counts, (str, bytes)):
        if isinstance(counts, str):
            counts = counts.encode("ascii") if counts.isascii() else b"\x00"
        runs = _rle_string_runs(counts)
        if runs is None:
            return "compressed RLE 'counts' is not a valid COCO RLE string", None
        covered, area = int(runs.sum()), int(runs[1::2].sum())
    else:
        return f"RLE 'counts' is a {type(counts).__name__}, not a list or a string", None
    if covered != h * w:
        return f"RLE counts cover {covered} pixels, the image has {h * w}", None
    return None, float(area)


def _annotation_problem(
    ann: dict, img: Optional[dict], id_map: dict, category_ids: str
) -> Optional[tuple]:
    """(kind, message) of the fault that makes ``ann`` unusable, or None.

    Args:
        category_ids: the ids of ``id_map``, as messages quote them.
    """
    if img is None:
        return "unknown_image", f"image_id {_short.repr(ann.get('image_id'))} is not in 'images'"
    h, w = img["height"], img["width"]
    if not _is_int(ann.get("category_id")) or ann["category_id"] not in id_map:
        return (
            "unknown_category",
            f"category_id {_short.repr(ann.get('category_id'))} is not in 'categories' "
            f"(ids {category_ids})",
        )
    box = ann.get("bbox")
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(map(_is_number, box))):
        return "bad_bbox", f"bbox {_short.repr(box)} is not 4 finite numbers [x, y, width, height]"
    if ann.get("iscrowd", 0) not in (0, 1):
        return "bad_iscrowd", f"iscrowd {_short.repr(ann['iscrowd'])} is not 0 or 1"
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
    if isinstance(segm, LongArray):
        return _too_many_points(segm.items // 2)
    if isinstance(segm, list):  # the polygons are checked together, in check_coco_dict
        if not segm:
            return "empty_segmentation", "'segmentation' is an empty list"
        points = sum(len(p) for p in segm if isinstance(p, (list, tuple))) // 2
        if points > MAX_POLYGON_POINTS:
            return _too_many_points(points)
        return None
    return "bad_segmentation", f"'segmentation' is a {type(segm).__name__}, not polygons or RLE"


def _too_many_points(points: int) -> Tuple[str, str]:
    return (
        "polygon_too_large",
        f"'segmentation' has {points} polygon points, more than the {MAX_POLYGON_POINTS} allowed "
        "(it is not rasterised)",
    )


def _fault_id(value):
    """An id as a fault keeps it: itself when a number or a short string, else shortened."""
    return (
        value if _is_int(value) or (type(value) is str and len(value) <= 40) else _short.repr(value)
    )


@functools.lru_cache(maxsize=None)
def _undescribed(kind: str) -> str:
    """The message of a fault past the first MAX_DESCRIBED_FAULTS (one string per kind)."""
    return f"{kind} (only the first {MAX_DESCRIBED_FAULTS} faults are described)"


class _FaultLog:
    """Faults of one pass over a file, in file order; past ``MAX_DESCRIBED_FAULTS`` faults, the
    message is replaced by a shared one naming the kind (the ids are kept)."""

    def __init__(self, json_file: str):
        self.json_file = json_file
        self.faults: List[DataFault] = []
        self.positions = array.array("q")  # index in the file of each fault's entry

    def add(self, position: int, kind: str, message: str, image_id, annotation_id, file_name):
        if len(self.faults) >= MAX_DESCRIBED_FAULTS:
            message = _undescribed(kind)
        fault = DataFault(kind, message, self.json_file, image_id, annotation_id, file_name)
        self.faults.append(fault)
        self.positions.append(position)


def _in_file_order(*logs: _FaultLog) -> List[DataFault]:
    """The faults of ``logs`` merged by position; the first MAX_DESCRIBED_FAULTS described."""
    faults = [fault for log in logs for fault in log.faults]
    positions = np.concatenate([np.frombuffer(log.positions, np.int64) for log in logs])
    faults = [faults[i] for i in np.argsort(positions, kind="stable")]
    for i in range(MAX_DESCRIBED_FAULTS, len(faults)):  # each log described its first ones
        if faults[i].message != _undescribed(faults[i].kind):
            faults[i] = replace(faults[i], message=_undescribed(faults[i].kind))
    return faults


def check_coco_dict(
    data: Dict[str, Any],
    json_file: str,
    image_root: Optional[str] = None,
    max_image_pixels: Optional[int] = None,
) -> CheckedCOCO:
    """Check a COCO instances dict (see the module docstring for what is checked).

    Args:
        data: the loaded JSON (top-level keys already checked by :func:`read_coco_json`).
        json_file: its path, for messages.
        image_root: when given, images whose file is missing there are faults.
        max_image_pixels: when given, an image entry declaring more pixels is an error.
    Raises:
        DatasetError: the file cannot be used at all.
    """
    thing_classes, id_map = _check_categories(data["categories"], json_file)
    images = _check_images(data["images"], json_file, max_image_pixels)
    _check_annotation_ids(data["annotations"], json_file)

    image_faults = _FaultLog(json_file)
    bad_images, bad_annotations = set(), set()
    if image_root is not None:
        found = files_exist(image_root, [img["file_name"] for img in images.values()])
        # positions -len(images)..-1: the images' faults come first in the file's order
        for i, (img_id, img), ok in zip(itertools.count(-len(images)), images.items(), found):
            if not ok:
                path = os.path.join(image_root, img["file_name"])
                message = f"image file {path} not found"
                image_faults.add(i, "missing_image_file", message, img_id, None, img["file_name"])
                bad_images.add(img_id)

    checks, polygon_checks = _FaultLog(json_file), _FaultLog(json_file)
    category_ids = _short.repr(sorted(id_map))
    kept_polygons = {}
    pending, candidates = [], []  # polygon annotations; polygons of the right shape
    annotations = data["annotations"]
    for i in np.flatnonzero(~_clean_annotations(annotations, images, id_map)).tolist():
        ann = annotations[i]
        img = images.get(ann.get("image_id")) if _is_id(ann.get("image_id")) else None
        file_name = img["file_name"] if img is not None else None
        problem = _annotation_problem(ann, img, id_map, category_ids)
        if problem is not None:
            checks.add(i, *problem, _fault_id(ann.get("image_id")), _fault_id(ann["id"]), file_name)
            bad_annotations.add(ann["id"])
            continue
        segm = ann["segmentation"]
        if isinstance(segm, dict):
            continue
        entries = []  # (polygon, problem, index into candidates)
        for poly in segm:
            problem = _polygon_shape_problem(poly)
            entries.append((poly, problem, len(candidates) if problem is None else -1))
            if problem is None:
                candidates.append(poly)
        pending.append((i, ann, img, entries))

    usable, polygon_areas, outlines = _polygon_checks(candidates)
    for i, ann, img, entries in pending:
        good, problems, area, outline = [], [], 0.0, 0.0
        for poly, problem, k in entries:
            if problem is None and not usable[k]:
                problem = (
                    "a polygon has non-numeric, non-finite or absurd (beyond "
                    f"+-{MAX_COORDINATE:.0e}) coordinates"
                )
            if problem is None:
                good.append(poly)
                area += float(polygon_areas[k])
                outline += float(outlines[k])
            else:
                problems.append(problem)

        def fault(kind: str, message: str, ann=ann, img=img, i=i) -> None:
            ids = _fault_id(ann["image_id"]), _fault_id(ann["id"])
            polygon_checks.add(i, kind, message, *ids, img["file_name"])

        if not good:
            fault("bad_polygons", f"no usable polygon: {problems[0]}")
        elif outline > MAX_POLYGON_OUTLINE:
            fault(
                "polygon_too_large",
                f"its polygons' outline is {outline:.0f} pixels long, more than the "
                f"{MAX_POLYGON_OUTLINE} allowed (points far outside the {img['width']}x"
                f"{img['height']} image?); it is not rasterised",
            )
        elif area == 0:
            fault("zero_area_mask", "its polygons enclose no area")
        else:
            if problems:
                message = f"{len(problems)} of {len(entries)} polygons dropped ({problems[0]})"
                fault("dropped_polygons", message)
                kept_polygons[ann["id"]] = good
            continue
        bad_annotations.add(ann["id"])
    faults = _in_file_order(image_faults, checks, polygon_checks)
    return CheckedCOCO(
        thing_classes,
        id_map,
        faults,
        bad_images,
        bad_annotations,
        kept_polygons,
        len(data["images"]),
        len(data["annotations"]),
        len(faults),
    )
