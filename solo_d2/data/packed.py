"""Checked datasets packed into arrays on disk, which every training process memory-maps.

detectron2's ``load_coco_json`` of a COCO train2017-sized file takes ~40 s, in each training
process, and each process then pickles its own copy of the dataset dicts. Here the first process
that reads and checks an annotation file (the launcher's registration, normally) also writes the
dataset dicts it gives (:func:`~solo_d2.data.dataset_dicts.to_dataset_dicts`) as columns: per image
its file path, size, id and the range of its annotations; per annotation its id, crowd flag, box
and class; all polygon coordinates in one float64 array with offsets; RLEs as their counts'
bytes with offsets and their sizes (plain arrays: nothing read from a pack runs code). The
training processes map those files instead of reading the JSON, so they share the pages; each
builds only the dicts its data loader asks for (:class:`PackedDataset`); the filtering of images
without annotations, LVIS's repeat factors and the class histogram are array operations.

A pack has the key of the check it came from (:mod:`~solo_d2.data.check_cache`: the annotation
file's path, size and modification time, the image folder, the check's parameters and code) and
lives in ``$SOLO_D2_CACHE/dataset_packs/<key>/``, written atomically (a folder renamed into place
once complete). Writing a pack for an annotation file removes its older packs.
``SOLO_D2_CACHE=off`` turns packs off too: every process then reads the file, as detectron2's do.

A pack is checked when it is opened (:func:`check_columns`): its meta, every column's presence,
dtype and shape, the offsets (from 0, non-decreasing, ending at their data's length) and the
indices into other columns. A pack that fails (tampered with, truncated, inconsistent, a file
missing) gets one warning naming its folder and is removed: the dataset is read from its JSON
again and the pack rewritten (:func:`has_pack` is False for it, so :func:`ensure_pack` writes a
new one). Only ``np.load(..., allow_pickle=False)`` reads a pack.
"""

import functools
import glob
import logging
import math
import os
import shutil
import time
import uuid
from itertools import chain, compress
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import orjson
import torch
import torch.utils.data as torchdata
from detectron2.structures import BoxMode

from .check_cache import cache_dir
from .dataset_dicts import dict_segmentation
from .record import current_check_key, dataset_record
from .validation import CheckedCOCO

__all__ = [
    "PackedDataset",
    "pack_dataset",
    "panoptic_columns",
    "panoptic_record",
    "write_pack",
    "open_pack",
    "open_packs",
    "has_pack",
    "packs_enabled",
    "ensure_pack",
    "check_columns",
    "DamagedPackError",
    "repeat_factors",
]

logger = logging.getLogger(__name__)

_FORMAT = 2  # the layout written here; packs of another format are ignored (1: pickled RLEs)
_META = "meta.json"
# column -> (dtype, ndim) of each layout; "offsets" columns have one entry more than what they
# index. "instances": COCO / LVIS dataset dicts (to_dataset_dicts); "panoptic": COCO panoptic ones
# (solo_d2.data.panoptic: per image its PNG and its segments).
_INSTANCE_COLUMNS = {
    "image_height": ("int64", 1),
    "image_width": ("int64", 1),
    "image_anns": ("int64", 1),
    "image_file_bytes": ("uint8", 1),
    "image_file_offsets": ("int64", 1),
    "ann_iscrowd": ("int8", 1),
    "ann_bbox": ("float64", 2),
    "ann_category": ("int64", 1),
    "ann_polygons": ("int64", 1),
    "ann_rle": ("int64", 1),
    "polygon_coords": ("int64", 1),
    "coords": ("float64", 1),
    "rle_counts": ("uint8", 1),
    "rle_offsets": ("int64", 1),
    "rle_size": ("int64", 2),
    "rle_counts_str": ("int8", 1),
}
_PANOPTIC_COLUMNS = {
    "image_height": ("int64", 1),
    "image_width": ("int64", 1),
    "image_segments": ("int64", 1),
    "image_file_bytes": ("uint8", 1),
    "image_file_offsets": ("int64", 1),
    "png_file_bytes": ("uint8", 1),
    "png_file_offsets": ("int64", 1),
    "seg_id": ("int64", 1),
    "seg_category": ("int64", 1),
    "seg_iscrowd": ("int8", 1),
    "seg_isthing": ("int8", 1),
    "seg_bbox": ("float64", 2),  # NaN where the segment has none
    "seg_area": ("float64", 1),
}
_LAYOUTS = {"instances": _INSTANCE_COLUMNS, "panoptic": _PANOPTIC_COLUMNS}
# layout -> its per-annotation column (the meta's num_annotations are its rows)
_ROWS = {"instances": "ann_iscrowd", "panoptic": "seg_id"}


class DamagedPackError(ValueError):
    """A pack on disk is not what :func:`write_pack` writes (its folder and the fault)."""

    def __init__(self, folder: str, fault: str):
        super().__init__(f"{folder}: {fault}")
        self.folder, self.fault = folder, fault


def _offsets(lengths) -> np.ndarray:
    """(N+1,) int64: 0, then the running sums of ``lengths``."""
    lengths = np.asarray(lengths, np.int64)
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _strings(prefix: str, values: Sequence[str]) -> Dict[str, np.ndarray]:
    """``values`` as UTF-8 bytes end to end (``<prefix>_bytes``) and offsets."""
    encoded = [v.encode("utf-8") for v in values]
    return {
        f"{prefix}_bytes": np.frombuffer(b"".join(encoded), np.uint8),
        f"{prefix}_offsets": _offsets([len(b) for b in encoded]),
    }


def _ids(prefix: str, values: list) -> Dict[str, np.ndarray]:
    """Ids as int64 (``<prefix>``) when all are integers, else as strings."""
    if set(map(type, values)) <= {int}:
        return {prefix: np.array(values, np.int64)}
    return _strings(prefix, values)


def pack_dataset(
    data: Dict[str, Any],
    checked: CheckedCOCO,
    image_root: str,
    image_lists: Sequence[str] = (),
) -> Optional[Dict[str, np.ndarray]]:
    """The columns of ``to_dataset_dicts(data, checked, image_root)``, or None when image or
    annotation ids mix integers and strings (such a dataset is not packed).

    Args:
        data: the checked COCO dict (an LVIS one adapted).
        checked: its check.
        image_lists: keys of per-image lists of integers each dict keeps (LVIS's
            ``neg_category_ids`` and ``not_exhaustive_category_ids``).
    Returns:
        name -> 1-D array (``ann_bbox``: (A, 4)); images sorted by id, the annotations of each
        image in file order; offsets arrays have one more entry than what they index.
    """
    images = [img for img in data["images"] if img["id"] not in checked.bad_images]
    if len(set(type(img["id"]) for img in images)) > 1:
        return None
    images.sort(key=lambda img: img["id"])
    position = {img["id"]: k for k, img in enumerate(images)}
    bad = checked.bad_annotations
    anns = [a for a in data["annotations"] if a["id"] not in bad and a["image_id"] in position]
    ids = [a["id"] for a in anns]
    if len(set(map(type, ids))) > 1:
        return None
    n = len(anns)
    owner = np.fromiter(map(position.__getitem__, [a["image_id"] for a in anns]), np.int64, n)
    order = np.argsort(owner, kind="stable")  # by image, in file order within one
    segms = [checked.kept_polygons.get(i, a["segmentation"]) for i, a in zip(ids, anns)]
    segms, ids = [segms[k] for k in order.tolist()], [ids[k] for k in order.tolist()]
    owner = owner[order]
    is_rle = np.fromiter((type(s) is dict for s in segms), bool, n)
    polygons = list(chain.from_iterable(compress(segms, (~is_rle).tolist())))
    lengths = np.fromiter(map(len, polygons), np.int64, len(polygons))
    rles = [
        dict_segmentation(segms[k], *_size(images[owner[k]]))
        for k in np.flatnonzero(is_rle).tolist()
    ]
    if any(set(r) != {"size", "counts"} for r in rles):
        return None  # an RLE with more keys than COCO's: kept as dicts, not packed
    is_str = [isinstance(r["counts"], str) for r in rles]
    counts = [
        r["counts"].encode("utf-8") if t else bytes(r["counts"]) for r, t in zip(rles, is_str)
    ]
    boxes = np.fromiter(chain.from_iterable([a["bbox"] for a in anns]), np.float64, 4 * n)
    classes = map(checked.id_map.__getitem__, [a["category_id"] for a in anns])
    columns = {
        "image_height": np.array([img["height"] for img in images], np.int64),
        "image_width": np.array([img["width"] for img in images], np.int64),
        "image_anns": _offsets(np.bincount(owner, minlength=len(images))),
        "ann_iscrowd": np.fromiter([a.get("iscrowd", 0) for a in anns], np.int8, n)[order],
        "ann_bbox": boxes.reshape(-1, 4)[order],
        "ann_category": np.fromiter(classes, np.int64, n)[order],
        "ann_polygons": _offsets(np.where(is_rle, 0, np.fromiter(map(len, segms), np.int64, n))),
        "ann_rle": np.where(is_rle, np.cumsum(is_rle) - 1, -1).astype(np.int64),
        "polygon_coords": _offsets(lengths),
        "coords": np.fromiter(chain.from_iterable(polygons), np.float64, int(lengths.sum())),
        "rle_counts": np.frombuffer(b"".join(counts), np.uint8),
        "rle_offsets": _offsets([len(c) for c in counts]),
        "rle_size": np.array([r["size"] for r in rles], np.int64).reshape(-1, 2),
        "rle_counts_str": np.array(is_str, np.int8),
        **_strings("image_file", [os.path.join(image_root, img["file_name"]) for img in images]),
        **_ids("image_id", [img["id"] for img in images]),
        **_ids("ann_id", ids),
    }
    for key in image_lists:
        values = [img[key] for img in images]
        columns[f"list_{key}"] = np.array([v for vs in values for v in vs], np.int64)
        columns[f"list_{key}_offsets"] = _offsets([len(vs) for vs in values])
    return columns


def panoptic_columns(
    images: Sequence[tuple], lengths: np.ndarray, segments: Dict[str, np.ndarray]
) -> Optional[Dict[str, np.ndarray]]:
    """The pack columns of checked COCO panoptic dataset dicts (:mod:`solo_d2.data.panoptic`),
    or None when the image ids mix integers and strings.

    Args:
        images: per image (file path, PNG path, image id, height, width), in the dicts' order.
        lengths: (I,) its number of segments.
        segments: the segments of all images end to end: "id", "category" (contiguous),
            "iscrowd", "isthing" (S,), "bbox" (S, 4) and "area" (S,), NaN where a segment has none.
    """
    if len(set(type(image[2]) for image in images)) > 1:
        return None
    files, pngs, ids, heights, widths = zip(*images) if images else ((),) * 5
    return {
        "image_height": np.array(heights, np.int64),
        "image_width": np.array(widths, np.int64),
        "image_segments": _offsets(lengths),
        "seg_id": np.asarray(segments["id"], np.int64),
        "seg_category": np.asarray(segments["category"], np.int64),
        "seg_iscrowd": np.asarray(segments["iscrowd"], np.int8),
        "seg_isthing": np.asarray(segments["isthing"], np.int8),
        "seg_bbox": np.asarray(segments["bbox"], np.float64).reshape(-1, 4),
        "seg_area": np.asarray(segments["area"], np.float64),
        **_strings("image_file", files),
        **_strings("png_file", pngs),
        **_ids("image_id", list(ids)),
    }


def panoptic_record(c: Dict[str, np.ndarray], k: int) -> Dict[str, Any]:
    """The ``k``-th dataset dict of panoptic columns ``c`` (:func:`panoptic_columns`, in memory
    or memory-mapped): the layout of :mod:`solo_d2.data.panoptic` (``PANOPTIC_SEGMENT_KEYS``)."""
    first, last = c["image_segments"][k : k + 2].tolist()
    names = ("seg_id", "seg_category", "seg_iscrowd", "seg_isthing", "seg_bbox", "seg_area")
    segments = []
    for sid, cat, crowd, thing, box, area in zip(*(c[n][first:last].tolist() for n in names)):
        seg = {"id": sid, "category_id": cat, "iscrowd": crowd, "isthing": bool(thing)}
        if not math.isnan(box[0]):
            seg["bbox"] = box
        if not math.isnan(area):
            seg["area"] = area
        segments.append(seg)
    return {
        "file_name": _text(c, "image_file", k),
        "image_id": _id(c, "image_id", k),
        "height": int(c["image_height"][k]),
        "width": int(c["image_width"][k]),
        "pan_seg_file_name": _text(c, "png_file", k),
        "segments_info": segments,
    }


def _text(c: Dict[str, np.ndarray], prefix: str, k: int) -> str:
    start, end = c[f"{prefix}_offsets"][k : k + 2].tolist()
    return c[f"{prefix}_bytes"][start:end].tobytes().decode("utf-8")


def _id(c: Dict[str, np.ndarray], prefix: str, k: int):
    column = c.get(prefix)
    return int(column[k]) if column is not None else _text(c, prefix, k)


def _layout(columns) -> str:
    return "panoptic" if "seg_id" in columns else "instances"


def _size(img: dict) -> tuple:
    return img["height"], img["width"]


def packs_enabled() -> bool:
    """Whether packs are written and read (not with ``SOLO_D2_CACHE=off``)."""
    return _packs_dir() is not None


def _packs_dir() -> Optional[str]:
    folder = cache_dir()
    return None if folder is None else os.path.join(os.path.dirname(folder), "dataset_packs")


def write_pack(
    key: str, json_file: str, columns: Optional[Dict[str, np.ndarray]], info: Dict[str, Any]
) -> None:
    """Store ``columns`` (:func:`pack_dataset`) as the pack of check ``key`` of ``json_file``
    and remove that file's older packs; nothing when the cache is off or ``columns`` is None.
    A failure to write only logs a warning (the processes then read the file).

    Args:
        info: JSON-serialisable facts kept with it (e.g. ``num_faults``).
    """
    root = _packs_dir()
    if root is None or columns is None:
        return
    target = os.path.join(root, key)
    temporary = f"{target}.tmp-{uuid.uuid4().hex}"  # unique across machines sharing the folder
    source = os.path.realpath(json_file)
    try:
        _remove_abandoned(root)
        os.makedirs(temporary, exist_ok=True)
        for name, array in columns.items():
            np.save(os.path.join(temporary, name + ".npy"), array, allow_pickle=False)
        meta = {
            "format": _FORMAT,
            "json_file": source,
            "columns": sorted(columns),
            "layout": _layout(columns),
            "num_images": len(columns["image_height"]),
            "num_annotations": len(columns[_ROWS[_layout(columns)]]),
            **info,
        }
        with open(os.path.join(temporary, _META), "wb") as f:
            f.write(orjson.dumps(meta))
        try:
            os.rename(temporary, target)
        except OSError:  # another process stored it first
            shutil.rmtree(temporary, ignore_errors=True)
        for meta_file in glob.glob(os.path.join(root, "*", _META)):
            folder = os.path.dirname(meta_file)
            if folder != target and _read_meta(folder).get("json_file") == source:
                shutil.rmtree(folder, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(temporary, ignore_errors=True)
        logger.warning(
            f"Could not write the packed dataset of {json_file} in {root} "
            f"({type(e).__name__}: {e}); each process reads the annotation file itself"
        )


def _remove_abandoned(root: str, age: float = 3600.0) -> None:
    """Remove the temporary folders of writes that crashed (untouched for ``age`` seconds)."""
    for folder in glob.glob(os.path.join(root, "*.tmp-*")):
        try:
            if time.time() - os.stat(folder).st_mtime > age:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass


def _read_meta(folder: str) -> dict:
    try:
        with open(os.path.join(folder, _META), "rb") as f:
            return orjson.loads(f.read())
    except (OSError, ValueError):
        return {}


def open_pack(key: str) -> Optional["PackedDataset"]:
    """The pack of check ``key``, memory-mapped and checked (:func:`check_columns`), or None:
    absent, incomplete, another format, the cache off, or damaged (then removed, with one
    warning naming its folder, so that it is written again from the annotation file)."""
    root = _packs_dir()
    if root is None or not key:
        return None
    folder = os.path.join(root, key)
    if _read_meta(folder).get("format") != _FORMAT:
        return None
    try:
        return PackedDataset(folder)
    except (OSError, ValueError) as e:  # DamagedPackError is a ValueError
        reason = e.fault if isinstance(e, DamagedPackError) else f"{type(e).__name__}: {e}"
        logger.warning(
            f"The packed dataset {folder} is damaged ({reason}); removed, the annotation file "
            "is read instead and the pack written again"
        )
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _check_offsets(folder: str, name: str, offsets: np.ndarray, entries: int, end: int) -> None:
    if len(offsets) != entries + 1:
        raise DamagedPackError(folder, f"{name} has {len(offsets)} entries, expected {entries + 1}")
    if offsets[0] != 0 or offsets[-1] != end:
        raise DamagedPackError(folder, f"{name} does not run from 0 to {end}")
    if (np.diff(offsets) < 0).any():
        raise DamagedPackError(folder, f"{name} decreases")


def check_columns(folder: str, meta: dict, columns: Dict[str, np.ndarray]) -> None:
    """Check that the columns of the pack in ``folder`` are what :func:`write_pack` writes.

    Raises:
        DamagedPackError: the first fault found (a column missing or of the wrong dtype, shape
            or length, offsets out of range or decreasing, indices out of range, meta that
            does not match).
    """
    layout = meta.get("layout", "instances")  # packs written before panoptic ones: instances
    if layout not in _LAYOUTS:
        raise DamagedPackError(folder, f"meta.json names no known layout ({layout!r})")
    expected = dict(_LAYOUTS[layout])
    for prefix in ("image_id", "ann_id") if layout == "instances" else ("image_id",):
        if prefix in columns:
            expected[prefix] = ("int64", 1)
        else:
            expected.update({f"{prefix}_bytes": ("uint8", 1), f"{prefix}_offsets": ("int64", 1)})
    for name in columns:
        if name.startswith("list_"):
            expected[name] = ("int64", 1)
    if set(expected) != set(meta.get("columns", ())):  # ``columns`` are the meta's
        raise DamagedPackError(folder, "its columns are not the ones its meta.json lists")
    for name, (dtype, ndim) in expected.items():
        column = columns[name]
        if column.dtype != np.dtype(dtype) or column.ndim != ndim:
            raise DamagedPackError(
                folder, f"column {name} is {column.dtype} {column.ndim}-D, expected {dtype}"
            )
    n, a = len(columns["image_height"]), len(columns[_ROWS[layout]])
    if (meta.get("num_images"), meta.get("num_annotations")) != (n, a):
        raise DamagedPackError(folder, f"meta.json does not match its {n} images, {a} annotations")
    if layout == "panoptic":
        _check_panoptic_columns(folder, columns, n, a)
        return
    lengths = {"image_width": n, "image_id": n, "ann_bbox": a, "ann_category": a, "ann_rle": a,
               "ann_id": a}  # fmt: skip
    for name, length in lengths.items():
        if name in columns and len(columns[name]) != length:
            raise DamagedPackError(
                folder, f"column {name} has {len(columns[name])} rows, not {length}"
            )
    if columns["ann_bbox"].shape[1:] != (4,):
        raise DamagedPackError(folder, "column ann_bbox is not (A, 4)")
    c = columns
    _check_offsets(folder, "image_anns", c["image_anns"], n, a)
    _check_offsets(folder, "ann_polygons", c["ann_polygons"], a, len(c["polygon_coords"]) - 1)
    _check_offsets(folder, "polygon_coords", c["polygon_coords"],
                   len(c["polygon_coords"]) - 1, len(c["coords"]))  # fmt: skip
    r = len(c["rle_offsets"]) - 1
    _check_offsets(folder, "rle_offsets", c["rle_offsets"], r, len(c["rle_counts"]))
    if c["rle_size"].shape != (r, 2) or len(c["rle_counts_str"]) != r:
        raise DamagedPackError(folder, "rle_size / rle_counts_str do not match rle_offsets")
    if len(c["ann_rle"]) and ((c["ann_rle"] < -1).any() or (c["ann_rle"] >= r).any()):
        raise DamagedPackError(folder, "ann_rle points outside the RLEs")
    for prefix, entries in (("image_file", n), ("image_id", n), ("ann_id", a)):
        if f"{prefix}_bytes" in c:
            _check_offsets(folder, f"{prefix}_offsets", c[f"{prefix}_offsets"], entries,
                           len(c[f"{prefix}_bytes"]))  # fmt: skip
    for name in columns:
        if _is_list(name):
            _check_offsets(folder, f"{name}_offsets", c[f"{name}_offsets"], n, len(c[name]))


def _check_panoptic_columns(folder: str, c: Dict[str, np.ndarray], n: int, s: int) -> None:
    """The lengths and offsets of a panoptic pack's columns (``n`` images, ``s`` segments)."""
    for name in ("image_width", "image_id", "seg_category", "seg_iscrowd", "seg_isthing",
                 "seg_bbox", "seg_area"):  # fmt: skip
        if name in c and len(c[name]) != (n if name.startswith("image") else s):
            raise DamagedPackError(folder, f"column {name} has {len(c[name])} rows")
    if c["seg_bbox"].shape[1:] != (4,):
        raise DamagedPackError(folder, "column seg_bbox is not (S, 4)")
    _check_offsets(folder, "image_segments", c["image_segments"], n, s)
    for prefix in ("image_file", "png_file", "image_id"):
        if f"{prefix}_bytes" in c:
            _check_offsets(folder, f"{prefix}_offsets", c[f"{prefix}_offsets"], n,
                           len(c[f"{prefix}_bytes"]))  # fmt: skip


@functools.lru_cache(maxsize=None)
def _mapped(folder: str) -> tuple:
    """(meta, columns) of the pack in ``folder``, the columns memory-mapped read-only and
    checked (:func:`check_columns`); read once per process.

    Raises:
        DamagedPackError, OSError: a damaged or missing file (not cached: tried again).
    """
    meta = _read_meta(folder)
    if meta.get("format") != _FORMAT or not isinstance(meta.get("columns"), list):
        raise DamagedPackError(folder, "meta.json is missing or not this format's")
    columns = {}
    for name in meta["columns"]:
        path = os.path.join(folder, f"{name}.npy")
        try:
            columns[name] = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:  # truncated, not an .npy, or an object array
            raise DamagedPackError(folder, f"{name}.npy cannot be read as an array ({e})") from None
        except FileNotFoundError:
            raise DamagedPackError(folder, f"{name}.npy is missing") from None
    check_columns(folder, meta, columns)
    return meta, columns


class PackedDataset(torchdata.Dataset):
    """detectron2 dataset dicts built on access from a pack (see the module docstring).

    ``dataset[i]`` is a new dict, equal to the ``i``-th of ``to_dataset_dicts`` (of
    ``indices[i]`` when made with :meth:`subset`); pickled (a data loader's workers under
    "spawn") it carries its folder and indices, not the data.
    """

    def __init__(self, folder: str, indices: Optional[np.ndarray] = None):
        self.folder = folder
        self.meta, self._columns = _mapped(folder)
        n = len(self._columns["image_height"])
        self.indices = np.arange(n) if indices is None else np.asarray(indices, np.int64)
        self._lists = [c[len("list_") :] for c in self.meta["columns"] if _is_list(c)]
        self.panoptic = self.meta.get("layout") == "panoptic"

    def __getstate__(self):
        return {"folder": self.folder, "indices": self.indices}

    def __setstate__(self, state):
        self.__init__(state["folder"], state["indices"])

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, indices) -> "PackedDataset":
        """The images ``indices`` (positions in this dataset), in that order."""
        return PackedDataset(self.folder, self.indices[np.asarray(indices, np.int64)])

    def __getitem__(self, i: int) -> Dict[str, Any]:
        c, k = self._columns, int(self.indices[i])
        if self.panoptic:
            return panoptic_record(c, k)
        first, last = c["image_anns"][k : k + 2].tolist()
        polygon_ends = c["ann_polygons"][first : last + 1]
        coord_ends = c["polygon_coords"][polygon_ends[0] : polygon_ends[-1] + 1]
        coords = c["coords"][coord_ends[0] : coord_ends[-1]].tolist()
        coord_ends = (coord_ends - coord_ends[0]).tolist()
        polygon_ends = (polygon_ends - polygon_ends[0]).tolist()
        boxes = c["ann_bbox"][first:last].tolist()
        crowd = c["ann_iscrowd"][first:last].tolist()
        classes = c["ann_category"][first:last].tolist()
        rles = c["ann_rle"][first:last].tolist()
        annotations = []
        for j in range(last - first):
            if rles[j] >= 0:
                r = rles[j]
                start, end = c["rle_offsets"][r : r + 2].tolist()
                counts = c["rle_counts"][start:end].tobytes()
                segm = {
                    "size": c["rle_size"][r].tolist(),
                    "counts": counts.decode("utf-8") if c["rle_counts_str"][r] else counts,
                }
            else:
                segm = [
                    coords[coord_ends[p] : coord_ends[p + 1]]
                    for p in range(polygon_ends[j], polygon_ends[j + 1])
                ]
            annotations.append(
                {
                    "id": _id(self._columns, "ann_id", first + j),
                    "iscrowd": crowd[j],
                    "bbox": boxes[j],
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "category_id": classes[j],
                    "segmentation": segm,
                }
            )
        record = {
            "file_name": _text(self._columns, "image_file", k),
            "height": int(c["image_height"][k]),
            "width": int(c["image_width"][k]),
            "image_id": _id(self._columns, "image_id", k),
            "annotations": annotations,
        }
        for key in self._lists:
            start, end = c[f"list_{key}_offsets"][k : k + 2].tolist()
            record[key] = c[f"list_{key}"][start:end].tolist()
        return record

    def to_dicts(self) -> List[Dict[str, Any]]:
        """All the dataset dicts, as a list."""
        return [self[i] for i in range(len(self))]

    def _annotation_owners(self) -> tuple:
        """(annotations of the images of this dataset, as indices into the pack's annotation
        columns; (A,) position in this dataset of the image of each)."""
        ends = self._columns["image_anns"]
        starts, counts = ends[self.indices], np.diff(ends)[self.indices]
        owners = np.repeat(np.arange(len(self)), counts)
        rows = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        return rows, owners

    def with_instances(self) -> "PackedDataset":
        """The images that have a non-crowd annotation (detectron2's
        ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``); all of a panoptic pack's (detectron2 filters
        only dicts with "annotations")."""
        if self.panoptic:
            return self
        rows, owners = self._annotation_owners()
        plain = self._columns["ann_iscrowd"][rows] == 0
        return self.subset(np.unique(owners[plain]))

    def class_histogram(self, num_classes: int) -> np.ndarray:
        """(num_classes,) int64: the non-crowd annotations of each class."""
        rows, _ = self._annotation_owners()
        classes = self._columns["ann_category"][rows]
        return np.bincount(classes[self._columns["ann_iscrowd"][rows] == 0], minlength=num_classes)

    @property
    def key(self) -> str:
        """The key of the check it was packed from."""
        return os.path.basename(self.folder)

    @property
    def num_faults(self) -> int:
        """The faults the check of its file found (left out)."""
        return self.meta["num_faults"]


def _is_list(column: str) -> bool:
    return column.startswith("list_") and not column.endswith("_offsets")


def repeat_factors(
    datasets: Sequence[PackedDataset], repeat_thresh: float, sqrt: bool = True
) -> torch.Tensor:
    """(N,) float32 repeat factors of the images of ``datasets`` end to end, for LVIS's
    repeat-factor sampling, as detectron2's
    ``RepeatFactorTrainingSampler.repeat_factors_from_category_frequency`` computes them from
    dataset dicts: r(c) = max(1, t / f(c)) (its square root with ``sqrt``), f(c) the fraction of
    images with an annotation (crowd or not) of class c; an image gets the largest r of its
    classes, 1 without annotations."""
    classes, owners, total = [], [], 0
    for dataset in datasets:
        rows, owner = dataset._annotation_owners()
        classes.append(dataset._columns["ann_category"][rows])
        owners.append(owner + total)
        total += len(dataset)
    classes, owners = np.concatenate(classes), np.concatenate(owners)
    num_classes = int(classes.max()) + 1 if len(classes) else 1
    pairs = np.unique(owners * num_classes + classes)  # (image, class) present
    image, category = pairs // num_classes, pairs % num_classes
    frequency = np.bincount(category, minlength=num_classes) / max(total, 1)
    with np.errstate(divide="ignore"):
        ratio = repeat_thresh / frequency
    per_class = np.maximum(1.0, np.sqrt(ratio) if sqrt else ratio)
    factors = np.ones(total)
    np.maximum.at(factors, image, per_class[category])
    return torch.tensor(factors, dtype=torch.float32)


def has_pack(key: str) -> bool:
    """Whether a complete, undamaged pack of check ``key`` exists (False with the cache off; a
    damaged one is removed: :func:`open_pack`)."""
    return open_pack(key) is not None


def ensure_pack(
    checked: CheckedCOCO,
    json_file: str,
    image_root: str,
    data: Optional[Dict[str, Any]],
    read: Callable[[], Dict[str, Any]],
    image_lists: Sequence[str] = (),
) -> None:
    """Write the pack of the checked ``json_file`` unless it exists (or the cache is off).

    Args:
        data: the file's checked content when it was just read, else None: ``read()`` gives it.
    """
    if _packs_dir() is None or has_pack(checked.key):
        return
    if data is None:
        data = read()
    columns = pack_dataset(data, checked, image_root, image_lists)
    write_pack(checked.key, json_file, columns, {"num_faults": checked.num_faults})


def open_packs(names: Sequence[str]) -> Optional[List[PackedDataset]]:
    """The packs of the registered datasets ``names``, as their files are now, or None unless
    every one has one (datasets of other kinds, a file changed since, the cache off)."""
    packs = []
    for name in names:
        record = dataset_record(name)
        if record is None or not record.check_key:
            return None
        try:
            key = current_check_key(record)
        except OSError:
            return None
        pack = open_pack(key) if key == record.check_key else None
        if pack is None:
            return None
        packs.append(pack)
    return packs
