"""COCO instance-segmentation datasets from the command line:
``--dataset NAME=ANNOTATIONS.json:IMAGE_DIR`` (the form :data:`solo_d2.data.specs.SPEC_FORM`).

The annotation file is checked when the dataset is registered (:mod:`solo_d2.data.validation`),
once per file content: later registrations (every training process) and the dataset's loader
reuse the outcome (:mod:`solo_d2.data.check_cache`). The faults found are reported once, and the
loader reads the file and gives the checked dataset dicts.
"""

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple

from detectron2.data import DatasetCatalog

from ..config.defaults import DEFAULT_MAX_IMAGE_PIXELS
from .check_cache import check_key, read_and_check
from .dataset_dicts import to_dataset_dicts
from .faults import summarize_faults
from .packed import ensure_pack, open_pack
from .record import DatasetRecord, dataset_record, set_dataset_record
from .specs import SPEC_FORM, is_registered_with, parse_dataset_spec, resolve_spec_paths
from .validation import CheckedCOCO

__all__ = [
    "COCO_FORMAT",
    "InstanceFormat",
    "register_coco_dataset",
    "register_instance_dataset",
    "warn_if_changed",
    "warn_instance_faults",
]

logger = logging.getLogger(__name__)

Reader = Callable[..., Tuple[Optional[Dict[str, Any]], CheckedCOCO, Dict[str, Any]]]


@dataclass(frozen=True)
class InstanceFormat:
    """A COCO-like instance-segmentation file format: COCO's (:data:`COCO_FORMAT`) or one that
    adapts it (LVIS: :data:`solo_d2.data.lvis.LVIS_FORMAT`)."""

    kind: str  # the record's kind, the metadata's evaluator_type and part of the check key
    prefix: str  # the spec's prefix after "NAME=" ("lvis:"), "" for none
    spec_form: str  # the spec's form, for messages
    # read_and_check(json_file, image_root, max_image_pixels, what="", need_data=True,
    # with_faults=True) -> (data, checked, extra) as check_cache.read_and_check; ``extra``
    # (JSON, kept with the check) is added to the dataset's metadata
    read_and_check: Reader
    image_lists: Tuple[str, ...] = ()  # image fields each dataset dict (and the pack) keeps


COCO_FORMAT = InstanceFormat("coco", "", SPEC_FORM, read_and_check)


def _load_dataset(
    fmt: InstanceFormat, name: str, json_file: str, image_root: str, max_image_pixels: int
) -> list:
    """DatasetCatalog loader: the checked dataset dicts (faults were reported at registration),
    from the file's pack when it has one (:mod:`~solo_d2.data.packed`)."""
    pack = open_pack(check_key(fmt.kind, json_file, image_root, max_image_pixels))
    if pack is not None:
        warn_if_changed(name, json_file, pack.key, pack.num_faults)
        return pack.to_dicts()
    data, checked, _ = fmt.read_and_check(
        json_file, image_root, max_image_pixels, with_faults=False
    )
    warn_if_changed(name, json_file, checked.key, checked.num_faults)
    # no pack (cache off, or a damaged one removed): written again from what was just read
    ensure_pack(checked, json_file, image_root, data, lambda: data, fmt.image_lists)
    return to_dataset_dicts(data, checked, image_root, fmt.image_lists)


def warn_if_changed(name: str, json_file: str, key: str, num_faults: int) -> None:
    """Warn when the annotation file (or image directory) of the registered dataset ``name``
    changed since it was registered: the dataset is now the checked new content.

    Args:
        key, num_faults: the check key of the content now, and the faults its check found.
    """
    record = dataset_record(name)
    if record is not None and key != record.check_key:
        logger.warning(
            f"Dataset {name!r} ({json_file}) changed since it was registered; it now has "
            f"{num_faults} faults, left out (they were listed when it was registered)"
        )


def warn_instance_faults(name: str, json_file: str, checked) -> None:
    """Log the faults a COCO-style check found (annotations and images left out), if any.

    Args:
        checked: the file's :class:`~solo_d2.data.validation.CheckedCOCO`.
    """
    if not checked.faults:
        return
    kept = checked.num_annotations - len(checked.bad_annotations)
    logger.warning(
        f"Dataset {name!r} ({json_file}): {len(checked.faults)} faults; left out "
        f"{len(checked.bad_annotations)} of {checked.num_annotations} annotations and "
        f"{len(checked.bad_images)} of {checked.num_images} images ({kept} annotations "
        f"kept). Set DATASETS.STRICT True to make them errors in training.\n"
        + summarize_faults(checked.faults)
    )


def register_coco_dataset(spec: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str:
    """Check and register the COCO instances dataset described by ``spec``; return its name
    (:func:`register_instance_dataset` of :data:`COCO_FORMAT`)."""
    return register_instance_dataset(COCO_FORMAT, spec, max_image_pixels)


def register_instance_dataset(
    fmt: InstanceFormat, spec: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> str:
    """Check and register the dataset of ``spec``, a file of format ``fmt``; return its name.

    The annotation file is checked now (:mod:`solo_d2.data.validation`; not read at all when its
    content was checked before, :func:`~solo_d2.data.check_cache.read_and_check`): a file that
    cannot be used raises (``FileNotFoundError`` / ``NotADirectoryError`` for the paths,
    ``ValueError`` for the spec and the content, an image entry declaring more than
    ``max_image_pixels`` pixels, ``INPUT.MAX_IMAGE_PIXELS``, included; one line naming the file);
    faulty annotations and images (missing image files) are logged, counted and named, and left
    out of the dataset. The metadata gets ``thing_classes`` at once (so
    ``MODEL.SOLO.NUM_CLASSES`` can be checked before training), the format's extra fields and
    the dataset's :class:`~solo_d2.data.record.DatasetRecord` (the faults, the check key). The
    file is packed for the training processes, which map the pack instead of reading the file.

    Registering a name again with the same files is a no-op; with other files it is an error.
    """
    name, json_str, image_str = parse_dataset_spec(spec, fmt.prefix, fmt.spec_form)
    json_file, image_root = resolve_spec_paths(
        spec, ("Annotation file", json_str), [("Image directory", image_str)]
    )
    files = {"json_file": json_file, "image_root": image_root}
    if is_registered_with(name, fmt.kind, files, f"spec {spec!r}"):
        return name
    what = f"(dataset spec {spec!r})"
    data, checked, extra = fmt.read_and_check(
        json_file, image_root, max_image_pixels, what, need_data=False
    )
    warn_instance_faults(name, json_file, checked)
    ensure_pack(
        checked,
        json_file,
        image_root,
        data,
        lambda: fmt.read_and_check(json_file, image_root, max_image_pixels, what)[0],
        fmt.image_lists,
    )
    DatasetCatalog.register(
        name, partial(_load_dataset, fmt, name, json_file, image_root, max_image_pixels)
    )
    record = DatasetRecord(fmt.kind, files, tuple(checked.faults), checked.key, max_image_pixels)
    set_dataset_record(
        name,
        record,
        **files,
        evaluator_type=fmt.kind,
        thing_classes=checked.thing_classes,
        thing_dataset_id_to_contiguous_id=checked.id_map,
        **extra,
    )
    return name
