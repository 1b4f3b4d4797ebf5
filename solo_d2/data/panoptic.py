"""COCO panoptic data: registration from the command line, checks, and the panoptic targets.

``--dataset NAME=panoptic:PANOPTIC.json:PANOPTIC_PNG_DIR:IMAGE_DIR`` registers a dataset in the
standard COCO panoptic format (Kirillov et al., "Panoptic Segmentation", CVPR 2019; the COCO 2018
panoptic task): a JSON with ``images``, ``annotations`` (one per image: the ``file_name`` of a PNG
in ``PANOPTIC_PNG_DIR`` and its ``segments_info``: ``id``, ``category_id``, ``iscrowd``, ...) and
``categories`` (``isthing`` 1 or 0). A PNG pixel's segment id is R + 256 G + 256^2 B; 0 is void.
Category ids need not be contiguous and segment ids are arbitrary positive integers.

The project's convention (metadata, dataset dicts, model outputs), detectron2's "separated"
panoptic convention:

* things: ``thing_classes`` are the ``isthing`` categories sorted by id, contiguous ids
  0..K_th-1 (``thing_dataset_id_to_contiguous_id``), the classes of the instance branch;
* stuff: ``stuff_classes`` are ``["things"]`` followed by the stuff categories sorted by id;
  contiguous ids 1..K_st (``stuff_dataset_id_to_contiguous_id``); 0 is the "things" class of
  the semantic target;
* the semantic target labels stuff pixels with their stuff id, every thing pixel (crowd regions
  included) 0, and void pixels ``IGNORE_LABEL`` (255), which the loss ignores.

Checks (the style of :mod:`solo_d2.data.validation`): an unusable JSON is an error at
registration; an image whose annotation, PNG or image file is missing, or whose segments name an
unknown category or repeat an id, is a fault: left out, counted and named. A PNG of the wrong
size or with a segment id missing from ``segments_info`` is found when the PNG is read
(:func:`read_panoptic_png`): the training mapper skips the image with a warning (an error with
``DATASETS.STRICT``), evaluation stops with the error.

detectron2's builtin ``coco_2017_{train,val}[_100]_panoptic`` (its "standard" convention, one
contiguous space for all 133 categories) are re-registered with this convention from the same
files by :func:`adopt_builtin_panoptic`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from typing import Any, Iterable, Optional

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools import mask as mask_util

from ..config.defaults import DEFAULT_MAX_IMAGE_PIXELS
from .check_cache import check_key, load_entry, store_entry
from .faults import (
    DataFault,
    DatasetError,
    faults_from_columns,
    faults_to_columns,
    summarize_faults,
)
from .images import BadImageError
from .packed import (
    has_pack,
    open_pack,
    packs_enabled,
    panoptic_columns,
    panoptic_record,
    write_pack,
)
from .record import DatasetRecord, dataset_record, set_dataset_record
from .specs import PANOPTIC_SPEC_FORM, is_registered_with, resolve_spec_paths
from .validation import (
    _check_images,
    _is_id,
    _is_int,
    _number_rows,
    files_exist,
    read_coco_json,
)

__all__ = [
    "IGNORE_LABEL",
    "PANOPTIC_SPEC_FORM",
    "parse_panoptic_spec",
    "panoptic_metadata",
    "check_panoptic_dict",
    "load_panoptic_dicts",
    "register_panoptic",
    "register_panoptic_dataset",
    "adopt_builtin_panoptic",
    "read_panoptic_png",
    "rgb_to_id",
    "panoptic_things_coco",
]

logger = logging.getLogger(__name__)

IGNORE_LABEL = 255  # void pixels of the semantic target
# the keys of a segment of the dataset dicts ("bbox" and "area" where the file has them)
PANOPTIC_SEGMENT_KEYS = ("id", "category_id", "iscrowd", "isthing", "bbox", "area")


def parse_panoptic_spec(spec: str) -> tuple[str, str, str, str]:
    """Split ``NAME=panoptic:PANOPTIC.json:PANOPTIC_PNG_DIR:IMAGE_DIR`` into its four parts.

    The JSON path may contain ``:`` (the two folders are taken from the right).
    """

    def bad(reason: str) -> ValueError:
        return ValueError(
            f"Bad dataset spec {spec!r}: {reason}; expected the form {PANOPTIC_SPEC_FORM}"
        )

    name, _, rest = spec.partition("=")
    name = name.strip()
    if not name:
        raise bad("empty dataset name")
    if not rest.startswith("panoptic:"):
        raise bad("missing the 'panoptic:' prefix")
    parts = rest[len("panoptic:") :].rsplit(":", 2)
    if len(parts) != 3:
        raise bad("it needs a JSON file, a PNG folder and an image folder separated by ':'")
    for part, what in zip(parts, ("panoptic JSON file", "PNG folder", "image folder")):
        if not part:
            raise bad(f"empty {what}")
    return name, *parts


def _check_panoptic_categories(categories: list, json_file: str) -> tuple[list, list]:
    """(things, stuff): the category dicts of each kind, sorted by id."""
    if not categories:
        raise DatasetError(f"Panoptic file {json_file!r} has no categories")
    seen = set()
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or "name" not in c:
            raise DatasetError(
                f"Panoptic file {json_file!r}: categories[{i}] needs an integer 'id' and a 'name'"
            )
        if c.get("isthing") not in (0, 1, True, False):
            raise DatasetError(
                f"Panoptic file {json_file!r}: category {c['id']} ({c['name']!r}) has isthing="
                f"{c.get('isthing')!r}; COCO panoptic categories need 'isthing' 0 or 1"
            )
        if c["id"] in seen:
            raise DatasetError(f"Panoptic file {json_file!r}: category id {c['id']} is used twice")
        seen.add(c["id"])
    ordered = sorted(categories, key=lambda c: c["id"])
    things = [c for c in ordered if c["isthing"]]
    stuff = [c for c in ordered if not c["isthing"]]
    if not things:
        raise DatasetError(f"Panoptic file {json_file!r} has no thing category (isthing 1)")
    return things, stuff


def panoptic_metadata(categories: list[dict]) -> dict[str, Any]:
    """The metadata of a panoptic dataset with these ``categories`` (see the module docstring).

    Returns:
        thing_classes, thing_dataset_id_to_contiguous_id, stuff_classes (``"things"`` first),
        stuff_dataset_id_to_contiguous_id (ids 1..K_st), ignore_label, and thing_colors /
        stuff_colors when every category has a "color".
    """
    things, stuff = _check_panoptic_categories(categories, "(categories)")
    meta = {
        "thing_classes": [str(c["name"]) for c in things],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(things)},
        "stuff_classes": ["things"] + [str(c["name"]) for c in stuff],
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i + 1 for i, c in enumerate(stuff)},
        "ignore_label": IGNORE_LABEL,
    }
    if all("color" in c for c in categories):
        meta["thing_colors"] = [list(c["color"]) for c in things]
        meta["stuff_colors"] = [[0, 0, 0]] + [list(c["color"]) for c in stuff]
    return meta


@dataclass
class CheckedPanoptic:
    """Result of :func:`check_panoptic_dict`: the usable images (``columns``, the pack layout of
    :func:`~solo_d2.data.packed.panoptic_columns`; :attr:`dicts` as dataset dicts), the faults,
    the metadata, the file's image count and how many of them were kept. ``columns`` is None
    when the outcome was kept from an earlier check and the file not read again."""

    columns: Optional[dict[str, np.ndarray]]
    faults: list[DataFault] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    num_images: int = 0
    num_kept: int = 0

    @property
    def dicts(self) -> list[dict]:
        """The usable images as dataset dicts (the module docstring's layout)."""
        return [panoptic_record(self.columns, k) for k in range(self.num_kept)]


def check_panoptic_dict(
    data: dict[str, Any],
    json_file: str,
    png_dir: str,
    image_dir: str,
    max_image_pixels: Optional[int] = None,
) -> CheckedPanoptic:
    """Check a COCO panoptic dict and convert it to dataset dicts (module docstring: conventions).

    Raises:
        DatasetError: the file cannot be used at all (categories, image entries, annotations that
            are not objects).
    """
    things, stuff = _check_panoptic_categories(data["categories"], json_file)
    meta = panoptic_metadata(data["categories"])
    thing_ids, stuff_ids = (
        meta["thing_dataset_id_to_contiguous_id"],
        meta["stuff_dataset_id_to_contiguous_id"],
    )
    images = _check_images(data["images"], json_file, max_image_pixels)
    faults = []

    def fault(kind, message, image_id=None, file_name=None):
        faults.append(DataFault(kind, message, json_file, image_id, None, file_name))

    by_image = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not _is_id(ann.get("image_id")):
            raise DatasetError(f"Panoptic file {json_file!r}: annotations[{i}] has no 'image_id'")
        image_id = ann["image_id"]
        if image_id not in images:
            fault("unknown_image", f"annotations[{i}] names image id {image_id!r}, not in images")
            continue
        if image_id in by_image:
            fault("duplicate_annotation", "has two panoptic annotations", image_id)
            continue
        by_image[image_id] = ann

    candidates, positions = [], []  # images whose files exist: their segments are screened
    image_faults = []  # (position in images, fault)
    pngs = {  # image id -> PNG name, for the annotations that have one
        image_id: ann["file_name"]
        for image_id, ann in by_image.items()
        if isinstance(ann.get("file_name"), str) and ann["file_name"]
    }
    png_found = dict(zip(pngs, files_exist(png_dir, list(pngs.values()))))
    image_found = files_exist(image_dir, [img["file_name"] for img in images.values()])
    for position, (image_id, img) in enumerate(images.items()):
        name = img["file_name"]
        problem = None
        if image_id not in by_image:
            problem = ("no_panoptic_annotation", "has no panoptic annotation")
        elif image_id not in pngs:
            problem = ("no_png", "its annotation has no PNG 'file_name'")
        else:
            png_path = os.path.join(png_dir, pngs[image_id])
            image_path = os.path.join(image_dir, name)
            if not png_found[image_id]:
                problem = ("missing_png", f"its PNG {png_path} does not exist")
            elif not image_found[position]:
                problem = ("missing_image", f"image file {image_path} does not exist")
        if problem:
            image_faults.append((position, DataFault(*problem, json_file, image_id, None, name)))
            continue
        candidates.append((image_path, png_path, image_id, img["height"], img["width"]))
        positions.append(position)
    infos = [by_image[c[2]].get("segments_info") for c in candidates]
    ok, lengths, segments = _screen_segments(infos, thing_ids, stuff_ids)
    for k in np.flatnonzero(~ok).tolist():  # the exact problem, checked one by one
        problem = _segments_problem(infos[k], thing_ids, stuff_ids)
        image_path, png_path, image_id = candidates[k][:3]
        message = f"{problem} (PNG {png_path})"
        name = images[image_id]["file_name"]
        fault = DataFault("bad_segments", message, json_file, image_id, None, name)
        image_faults.append((positions[k], fault))
    faults += [f for _, f in sorted(image_faults, key=lambda pf: pf[0])]
    keep = np.repeat(ok, lengths)
    segments = {key: column[keep] for key, column in segments.items()}
    kept = [c for c, good in zip(candidates, ok.tolist()) if good]
    columns = panoptic_columns(kept, lengths[ok], segments)
    if columns is None:
        raise DatasetError(f"Panoptic file {json_file!r}: image ids mix integers and strings")
    return CheckedPanoptic(columns, faults, meta, len(data["images"]), len(kept))


def _screen_segments(
    infos: list, thing_ids: dict, stuff_ids: dict
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The ``segments_info`` of I images checked with array operations.

    Returns:
        ok: (I,) bool, the images all of whose segments pass (the others hold a problem that
            :func:`_segments_problem` names); lengths: (I,) their segment counts; the segments of
            all images end to end as :func:`~solo_d2.data.packed.panoptic_columns` takes them
            (category ids contiguous; "bbox" / "area" NaN where absent or not numbers).
    """
    n = len(infos)
    is_list = np.fromiter((type(x) is list for x in infos), bool, n)
    lengths = np.fromiter((len(x) if type(x) is list else 0 for x in infos), np.int64, n)
    flat = list(chain.from_iterable(x for x in infos if type(x) is list))
    s = len(flat)
    owner = np.repeat(np.arange(n), lengths)
    is_dict = np.fromiter((type(x) is dict for x in flat), bool, s)
    if not is_dict.all():
        flat = [x if type(x) is dict else {} for x in flat]
    ids = [x.get("id") for x in flat]
    categories = [x.get("category_id") for x in flat]
    crowd = [x.get("iscrowd", 0) for x in flat]
    int_ids = set(map(type, ids)) <= {int}
    id_ok = np.ones(s, bool) if int_ids else np.fromiter((type(v) is int for v in ids), bool, s)
    try:
        id_values = np.fromiter((v if t else 0 for v, t in zip(ids, id_ok.tolist())), np.int64, s)
    except OverflowError:  # beyond int64: left to the one-by-one check
        id_values, id_ok = np.zeros(s, np.int64), np.zeros(s, bool)
    id_ok &= (id_values > 0) & (id_values < 256**3)
    table = {cid: k for k, cid in enumerate([*thing_ids, *stuff_ids])}
    if set(map(type, categories)) <= {int}:
        index = np.fromiter((table.get(v, -1) for v in categories), np.int64, s)
    else:
        index = np.fromiter(
            (table.get(v, -1) if _is_hashable(v) else -1 for v in categories), np.int64, s
        )
    contiguous = np.array([*thing_ids.values(), *stuff_ids.values()], np.int64)
    isthing = np.arange(len(table)) < len(thing_ids)
    crowd_ok = np.fromiter((v in (0, 1) for v in crowd), bool, s)  # as _segments_problem
    good = is_dict & id_ok & (index >= 0) & crowd_ok
    key = owner * 256**3 + id_values
    order = np.argsort(key, kind="stable")
    repeated = np.zeros(s, bool)
    repeated[order[1:]] = key[order[1:]] == key[order[:-1]]
    bad = ~good | repeated
    ok = is_list & (np.bincount(owner[bad], minlength=n) == 0)
    boxes_ok, boxes = _number_rows([x.get("bbox") for x in flat], 4)
    areas = [x.get("area") for x in flat]
    if set(map(type, areas)) <= {int, float}:
        areas = np.array(areas, np.float64)
    else:  # not numbers: no area (NaN)
        areas = np.fromiter((v if type(v) in (int, float) else np.nan for v in areas), float, s)
    return (
        ok,
        lengths,
        {
            "id": id_values,
            "category": np.where(index >= 0, contiguous[np.maximum(index, 0)], -1),
            "iscrowd": np.fromiter((v == 1 for v in crowd), bool, s).astype(np.int8),
            "isthing": isthing[np.maximum(index, 0)] & (index >= 0),
            "bbox": np.where(boxes_ok[:, None], boxes, np.nan),
            "area": areas,
        },
    )


def _is_hashable(value) -> bool:
    return not isinstance(value, (list, dict, set))


def _segments_problem(segments, thing_ids: dict, stuff_ids: dict) -> str:
    """What is wrong with an image's ``segments_info`` that :func:`_screen_segments` refused,
    in words (the first problem, in file order)."""
    if not isinstance(segments, list):
        return "'segments_info' is missing or not a list"
    seen = set()
    for s in segments:
        if not isinstance(s, dict):
            return f"segments_info has {s!r}, not an object"
        sid, cid = s.get("id"), s.get("category_id")
        if not _is_int(sid) or sid <= 0 or sid >= 256**3:
            return f"segment id {sid!r} is not an integer in 1..{256**3 - 1}"
        if sid in seen:
            return f"segment id {sid} is used twice"
        seen.add(sid)
        if not _is_hashable(cid) or (cid not in thing_ids and cid not in stuff_ids):
            return f"segment {sid} has category_id {cid!r}, not in the categories"
        iscrowd = s.get("iscrowd", 0)
        if iscrowd not in (0, 1):
            return f"segment {sid} has iscrowd={iscrowd!r}, not 0 or 1"
    return "its segments cannot be read"  # not reached: the screen refuses only the above


def load_panoptic_dicts(
    json_file: str, png_dir: str, image_dir: str, max_image_pixels: Optional[int] = None
) -> list[dict]:
    """The checked dataset dicts of a COCO panoptic dataset (faulty images left out)."""
    data = read_coco_json(json_file)
    return check_panoptic_dict(data, json_file, png_dir, image_dir, max_image_pixels).dicts


def panoptic_check_key(json_file: str, png_dir: str, image_dir: str, max_pixels: int) -> str:
    """The key of checking a panoptic dataset's files (it changes when the JSON, the image
    folder or the PNG folder changes): its check cache entry's and its pack's."""
    return check_key("panoptic", json_file, image_dir, max_pixels, (png_dir,))


def read_and_check_panoptic(
    json_file: str,
    png_dir: str,
    image_dir: str,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    what: str = "",
    need_dicts: bool = True,
) -> tuple[CheckedPanoptic, str]:
    """Read and check a panoptic dataset at most once per content of its files: (outcome, check
    key). The outcome's categories and faults are kept in the check cache
    (:mod:`~solo_d2.data.check_cache`); without ``need_dicts`` a kept outcome is returned
    without the images (``columns`` None) and the file is not read.

    Raises:
        DatasetError: the file cannot be used at all. OSError: it cannot be read.
    """
    key = panoptic_check_key(json_file, png_dir, image_dir, max_pixels)
    entry = load_entry(key)
    if entry is not None and not need_dicts:
        faults = faults_from_columns(entry["faults"])
        meta = panoptic_metadata(entry["categories"])
        return CheckedPanoptic(None, faults, meta, *entry["images"]), key
    data = read_coco_json(json_file, what)
    checked = check_panoptic_dict(data, json_file, png_dir, image_dir, max_pixels)
    if entry is None:
        faults = faults_to_columns(checked.faults)
        images = [checked.num_images, checked.num_kept]
        store_entry(key, {"categories": data["categories"], "faults": faults, "images": images})
    return checked, key


def _ensure_panoptic_pack(key: str, json_file: str, checked: CheckedPanoptic, read) -> None:
    """Write the pack of a checked panoptic dataset unless it has one (or the cache is off);
    ``read()`` gives the checked file when ``checked`` was kept from an earlier check."""
    if not packs_enabled() or has_pack(key):
        return
    columns = (read() if checked.columns is None else checked).columns
    write_pack(key, json_file, columns, {"num_faults": len(checked.faults)})


def _load_registered(name: str, json_file: str, png_dir: str, image_dir: str, max_pixels: int):
    """DatasetCatalog loader: the checked dataset dicts, from the pack when there is one."""
    record = dataset_record(name)
    key = panoptic_check_key(json_file, png_dir, image_dir, max_pixels)
    pack = open_pack(key)
    if pack is not None and record is not None and key == record.check_key:
        return pack.to_dicts()
    checked, key = read_and_check_panoptic(json_file, png_dir, image_dir, max_pixels)
    if record is not None and key != record.check_key:
        logger.warning(
            f"Dataset {name!r} ({json_file}) changed since it was registered; it now has "
            f"{len(checked.faults)} faults, left out:\n{summarize_faults(checked.faults)}"
        )
    _ensure_panoptic_pack(key, json_file, checked, None)
    return checked.dicts


def register_panoptic(
    name: str,
    json_file: str,
    png_dir: str,
    image_dir: str,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> str:
    """Check the files now, then register ``name`` (loaded again, lazily, by DatasetCatalog).

    The check is done once per content of the files (:func:`read_and_check_panoptic`), and the
    dataset dicts are packed for the training processes (:mod:`solo_d2.data.packed`), as COCO
    files are. Metadata: :func:`panoptic_metadata`, ``panoptic_json``, ``panoptic_root``,
    ``image_root``, ``evaluator_type="coco_panoptic_seg"`` and its
    :class:`~solo_d2.data.record.DatasetRecord` (kind "panoptic", the faults, the check key).
    Registering a name again with the same files is a no-op; with other files it is an error.
    """
    files = (str(json_file), str(png_dir), str(image_dir))
    expected = dict(zip(("panoptic_json", "panoptic_root", "image_root"), files))
    if is_registered_with(name, "panoptic", expected, f"files {files}"):
        return name
    what = f"(panoptic dataset {name!r})"
    checked, key = read_and_check_panoptic(*files, max_image_pixels, what, need_dicts=False)
    if checked.faults:
        logger.warning(
            f"Dataset {name!r} ({json_file}): {len(checked.faults)} faults; left out "
            f"{checked.num_images - checked.num_kept} of {checked.num_images} images. Set "
            "DATASETS.STRICT True to make them errors in training.\n"
            + summarize_faults(checked.faults)
        )

    def read():
        return read_and_check_panoptic(*files, max_image_pixels, what)[0]

    _ensure_panoptic_pack(key, files[0], checked, read)
    DatasetCatalog.register(name, partial(_load_registered, name, *files, max_image_pixels))
    record = DatasetRecord("panoptic", expected, tuple(checked.faults), key, max_image_pixels)
    set_dataset_record(
        name, record, **checked.metadata, **expected, evaluator_type="coco_panoptic_seg"
    )
    return name


def register_panoptic_dataset(spec: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str:
    """Check and register the dataset of a ``--dataset`` :data:`PANOPTIC_SPEC_FORM` spec."""
    name, json_file, png_dir, image_dir = parse_panoptic_spec(spec)
    paths = resolve_spec_paths(
        spec,
        ("Panoptic JSON file", json_file),
        [("PNG directory", png_dir), ("Image directory", image_dir)],
    )
    return register_panoptic(name, *paths, max_image_pixels)


def adopt_builtin_panoptic(names: Iterable[str]) -> list[str]:
    """Re-register detectron2's builtin standard COCO panoptic datasets among ``names`` with this
    module's convention, from the same files; return the names re-registered.

    detectron2 registers ``coco_2017_*_panoptic`` with one contiguous id space for things and
    stuff together, ``sem_seg`` targets derived from the instance JSON; the SOLO model needs the
    separate thing and stuff spaces. Names whose files are not on disk are left alone (the config
    check reports them).
    """
    adopted = []
    for name in names:
        if name not in DatasetCatalog.list():
            continue
        meta = MetadataCatalog.get(name)
        if (
            dataset_record(name) is not None
            or meta.get("evaluator_type", None) != "coco_panoptic_seg"
        ):
            continue
        files = [meta.get(k, None) for k in ("panoptic_json", "panoptic_root", "image_root")]
        if not all(isinstance(f, str) and os.path.exists(f) for f in files):
            continue
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        register_panoptic(name, *files)
        adopted.append(name)
    return adopted


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB panoptic PNG -> (H, W) int64 segment ids R + 256 G + 256^2 B."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def read_panoptic_png(dataset_dict: dict, image_hw: tuple[int, int]) -> np.ndarray:
    """Read and check the panoptic PNG of ``dataset_dict``.

    Args:
        dataset_dict: a dict of :func:`load_panoptic_dicts` (pan_seg_file_name, segments_info).
        image_hw: (H, W) of its image as read.
    Returns:
        (H, W, 3) uint8 RGB (augmentations resize it with nearest neighbours; :func:`rgb_to_id`
        decodes it).
    Raises:
        BadImageError: naming the PNG, when it is missing or unreadable, is not RGB, is not the
            image's size, or holds a segment id that its ``segments_info`` lacks.
    """
    path = dataset_dict["pan_seg_file_name"]
    try:
        with Image.open(path) as im:
            if im.size != (image_hw[1], image_hw[0]):
                raise BadImageError(
                    path,
                    f"is a {im.size[0]}x{im.size[1]} panoptic PNG (width x height) but its image "
                    f"{dataset_dict['file_name']} is {image_hw[1]}x{image_hw[0]}",
                )
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise BadImageError(path, "panoptic PNG does not exist") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(path, f"panoptic PNG cannot be read ({e})") from None
    ids = np.unique(rgb_to_id(rgb))
    known = {s["id"] for s in dataset_dict["segments_info"]}
    unknown = [int(i) for i in ids if i != 0 and int(i) not in known]
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
        raise BadImageError(
            path,
            f"holds segment ids {shown} that segments_info of image id "
            f"{dataset_dict.get('image_id')} lacks",
        )
    return rgb


def panoptic_things_coco(name: str) -> dict[str, Any]:
    """The thing instances of the registered panoptic dataset ``name`` as a COCO instances dict,
    for COCO mask and box AP beside PQ (as detectron2 evaluates its COCO panoptic datasets).

    The ground truth is the one PQ is computed on: the annotations of the panoptic JSON
    (``panoptic_json``) of the dataset's images, their PNGs (``panoptic_root``). Each thing
    segment becomes an annotation: its PNG pixels as an RLE mask, the box and area of that mask,
    its ``iscrowd``, its dataset category id; categories are the thing categories. A thing
    segment without pixels in its PNG is left out. Stuff segments are not instances.

    Raises:
        DatasetError: the panoptic JSON is unusable or lacks an annotation of a dataset image.
        BadImageError: a PNG is missing, unreadable, not its image's size, or holds a segment id
            that its segments_info lacks (:func:`read_panoptic_png`).
    """
    # first: a generated dataset (shapes_panoptic) writes its files on its first load
    image_ids = list(dict.fromkeys(d["image_id"] for d in DatasetCatalog.get(name)))
    meta = MetadataCatalog.get(name)
    json_file, png_dir = meta.panoptic_json, meta.panoptic_root
    data = read_coco_json(json_file, f"(panoptic dataset {name!r})")
    things, _ = _check_panoptic_categories(data["categories"], json_file)
    thing_ids = {c["id"] for c in things}
    images = {im["id"]: im for im in data["images"] if isinstance(im, dict) and "id" in im}
    annotations = {a["image_id"]: a for a in data["annotations"] if isinstance(a, dict)}
    missing = [i for i in image_ids if i not in images or i not in annotations]
    if missing:
        raise DatasetError(
            f"Panoptic file {json_file!r} has no image entry or annotation for {len(missing)} "
            f"of the {len(image_ids)} images of dataset {name!r} (image ids {missing[:5]})"
        )
    instances = []
    for image_id in image_ids:
        image, ann = images[image_id], annotations[image_id]
        segments = [s for s in ann["segments_info"] if s["category_id"] in thing_ids]
        if not segments:
            continue
        record = {
            "file_name": image["file_name"],
            "image_id": image_id,
            "pan_seg_file_name": os.path.join(png_dir, ann["file_name"]),
            "segments_info": ann["segments_info"],
        }
        ids = rgb_to_id(read_panoptic_png(record, (image["height"], image["width"])))
        for s in segments:
            mask = ids == s["id"]
            if not mask.any():
                continue
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            instances.append(
                {
                    "id": len(instances) + 1,
                    "image_id": image_id,
                    "category_id": s["category_id"],
                    "iscrowd": int(s.get("iscrowd", 0)),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "area": float(mask_util.area(rle)),
                }
            )
    return {
        "images": [images[i] for i in image_ids],
        "annotations": instances,
        "categories": things,
    }
