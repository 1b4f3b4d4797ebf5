"""Checked datasets packed into arrays on disk, which every training process memory-maps.

detectron2's ``load_coco_json`` of a COCO train2017-sized file takes ~40 s, in each training
process, and each process then pickles its own copy of the dataset dicts. Here the first process
that reads and checks an annotation file (the launcher's registration, normally) also writes the
dataset dicts it gives (:func:`~solo_d2.data.validation.to_dataset_dicts`) as columns: per image
its file path, size, id and the range of its annotations; per annotation its id, crowd flag, box
and class; all polygon coordinates in one float64 array with offsets; RLEs pickled. The
training processes map those files instead of reading the JSON, so they share the pages; each
builds only the dicts its data loader asks for (:class:`PackedDataset`); the filtering of images
without annotations, LVIS's repeat factors and the class histogram are array operations.

A pack has the key of the check it came from (:mod:`~solo_d2.data.check_cache`: the annotation
file's path, size and modification time, the image folder, the check's parameters and code) and
lives in ``$SOLO_D2_CACHE/dataset_packs/<key>/``, written atomically (a folder renamed into place
once complete). Writing a pack for an annotation file removes its older packs.
``SOLO_D2_CACHE=off`` turns packs off too: every process then reads the file, as detectron2's do.
"""

import functools
import glob
import logging
import os
import pickle
import shutil
import time
import uuid
from itertools import chain, compress
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import orjson
import torch
import torch.utils.data as torchdata
from detectron2.data import MetadataCatalog
from detectron2.structures import BoxMode

from .check_cache import cache_dir
from .validation import CheckedCOCO, check_key, dict_segmentation

__all__ = [
    "PackedDataset",
    "pack_dataset",
    "write_pack",
    "open_pack",
    "open_packs",
    "has_pack",
    "ensure_pack",
    "repeat_factors",
]

logger = logging.getLogger(__name__)

_FORMAT = 1  # the layout written here; packs of another format are ignored
_META = "meta.json"


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
        pickle.dumps(dict_segmentation(segms[k], *_size(images[owner[k]])), protocol=-1)
        for k in np.flatnonzero(is_rle).tolist()
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
        "rle_bytes": np.frombuffer(b"".join(rles), np.uint8),
        "rle_offsets": _offsets([len(r) for r in rles]),
        **_strings("image_file", [os.path.join(image_root, img["file_name"]) for img in images]),
        **_ids("image_id", [img["id"] for img in images]),
        **_ids("ann_id", ids),
    }
    for key in image_lists:
        values = [img[key] for img in images]
        columns[f"list_{key}"] = np.array([v for vs in values for v in vs], np.int64)
        columns[f"list_{key}_offsets"] = _offsets([len(vs) for vs in values])
    return columns


def _size(img: dict) -> tuple:
    return img["height"], img["width"]


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
        meta = {"format": _FORMAT, "json_file": source, "columns": sorted(columns), **info}
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
    """The pack of check ``key``, memory-mapped, or None (absent, incomplete, cache off)."""
    root = _packs_dir()
    if root is None or not key:
        return None
    folder = os.path.join(root, key)
    if _read_meta(folder).get("format") != _FORMAT:
        return None
    try:
        return PackedDataset(folder)
    except (OSError, ValueError) as e:
        logger.warning(f"Ignoring the unreadable packed dataset {folder}: {e}")
        return None


@functools.lru_cache(maxsize=None)
def _mapped(folder: str) -> tuple:
    """(meta, columns) of the pack in ``folder``, the columns memory-mapped read-only; read
    once per process."""
    meta = _read_meta(folder)
    columns = {
        name: np.load(os.path.join(folder, name + ".npy"), mmap_mode="r", allow_pickle=False)
        for name in meta["columns"]
    }
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

    def __getstate__(self):
        return {"folder": self.folder, "indices": self.indices}

    def __setstate__(self, state):
        self.__init__(state["folder"], state["indices"])

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, indices) -> "PackedDataset":
        """The images ``indices`` (positions in this dataset), in that order."""
        return PackedDataset(self.folder, self.indices[np.asarray(indices, np.int64)])

    def _text(self, prefix: str, k: int) -> str:
        c = self._columns
        start, end = c[f"{prefix}_offsets"][k : k + 2].tolist()
        return c[f"{prefix}_bytes"][start:end].tobytes().decode("utf-8")

    def _id(self, prefix: str, k: int):
        column = self._columns.get(prefix)
        return int(column[k]) if column is not None else self._text(prefix, k)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        c, k = self._columns, int(self.indices[i])
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
                start, end = c["rle_offsets"][rles[j] : rles[j] + 2].tolist()
                segm = pickle.loads(c["rle_bytes"][start:end].tobytes())
            else:
                segm = [
                    coords[coord_ends[p] : coord_ends[p + 1]]
                    for p in range(polygon_ends[j], polygon_ends[j + 1])
                ]
            annotations.append(
                {
                    "id": self._id("ann_id", first + j),
                    "iscrowd": crowd[j],
                    "bbox": boxes[j],
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "category_id": classes[j],
                    "segmentation": segm,
                }
            )
        record = {
            "file_name": self._text("image_file", k),
            "height": int(c["image_height"][k]),
            "width": int(c["image_width"][k]),
            "image_id": self._id("image_id", k),
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
        ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``)."""
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
    """Whether a complete pack of check ``key`` exists (False with the cache off)."""
    root = _packs_dir()
    return (
        root is not None
        and bool(key)
        and (_read_meta(os.path.join(root, key)).get("format") == _FORMAT)
    )


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
        meta = MetadataCatalog.get(name)
        kind = meta.get("evaluator_type", None)
        if kind not in ("coco", "lvis") or not meta.get("data_check_key", None):
            return None
        try:
            key = check_key(kind, meta.json_file, meta.image_root, meta.max_image_pixels)
        except OSError:
            return None
        pack = open_pack(key) if key == meta.data_check_key else None
        if pack is None:
            return None
        packs.append(pack)
    return packs
