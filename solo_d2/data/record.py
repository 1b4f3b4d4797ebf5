"""The typed record of a dataset that solo_d2 registered: one per name, in its metadata.

detectron2's own metadata keys (``json_file``, ``image_root``, ``evaluator_type``,
``thing_classes``, ``panoptic_root``, ...) stay where detectron2's code reads them. What solo_d2
itself knows about a dataset it checked and registered (its kind, the files it was read from, the
faults left out, the key of its check and pack, the image size limit it was checked with) is one
:class:`DatasetRecord`, set by the module that registers the dataset and read through
:func:`dataset_record`. A dataset without a record was registered by someone else (detectron2's
builtin datasets, a user's own code): nothing of it was checked by solo_d2.
"""

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from detectron2.data import MetadataCatalog

from ..config.defaults import DEFAULT_MAX_IMAGE_PIXELS
from .check_cache import check_key
from .faults import DataFault

__all__ = [
    "RECORD_KEY",
    "DatasetRecord",
    "current_check_key",
    "dataset_record",
    "set_dataset_record",
]

RECORD_KEY = "solo_d2"  # the metadata key holding the record


@dataclass(frozen=True)
class DatasetRecord:
    """What solo_d2 registered a dataset from, and what its check found.

    Attributes:
        kind: the name of its dataset kind (:mod:`solo_d2.kinds`): "coco", "lvis", "panoptic".
        files: role -> absolute path of what it was read from, the annotation file first, e.g.
            ``{"json_file": ..., "image_root": ...}``; a panoptic dataset: ``panoptic_json``,
            ``panoptic_root``, ``image_root``. Registering the name again from the same files is
            a no-op.
        faults: the annotations and images left out (logged at registration).
        check_key: the key of its check in the check cache, which is also its pack's
            (:mod:`solo_d2.data.packed`); "" for a kind that is not packed.
        max_image_pixels: ``INPUT.MAX_IMAGE_PIXELS`` it was checked with.
    """

    kind: str
    files: Mapping[str, str]
    faults: Tuple[DataFault, ...] = ()
    check_key: str = ""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def current_check_key(record: DatasetRecord) -> str:
    """The check key of the record's files as they are now: its ``check_key`` unless one of
    them changed since (:func:`~solo_d2.data.check_cache.check_key`: the annotation file, the
    image folder, the other folders).

    Raises:
        OSError: a file or folder cannot be read.
    """
    files = dict(record.files)
    image_root = files.pop("image_root")
    json_file, *folders = files.values()
    return check_key(record.kind, json_file, image_root, record.max_image_pixels, folders)


def dataset_record(name: str) -> Optional[DatasetRecord]:
    """The record of the registered dataset ``name``; None when solo_d2 did not register it."""
    record = MetadataCatalog.get(name).get(RECORD_KEY, None)
    return record if isinstance(record, DatasetRecord) else None


def set_dataset_record(name: str, record: DatasetRecord, **metadata) -> None:
    """Set the record of ``name`` and detectron2's ``metadata`` keys (``thing_classes``, ...)."""
    MetadataCatalog.get(name).set(**{RECORD_KEY: record}, **metadata)
