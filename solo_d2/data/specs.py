"""Dataset specs: the ``--dataset`` forms, parsing them and checking the paths they name.

A spec registers a dataset in detectron2's ``DatasetCatalog`` / ``MetadataCatalog`` under
``NAME`` so that ``DATASETS.TRAIN`` / ``DATASETS.TEST`` can name it. The forms
, each registered by its own module, built on this one:

* ``NAME=ANNOTATIONS.json:IMAGE_DIR``: COCO instance segmentation (:mod:`solo_d2.data.coco`);
* ``NAME=panoptic:PANOPTIC.json:PANOPTIC_PNG_DIR:IMAGE_DIR``: COCO panoptic
  (:mod:`solo_d2.data.panoptic`);
* ``NAME=lvis:ANNOTATIONS.json:IMAGE_DIR``: LVIS (:mod:`solo_d2.data.lvis`).

Choosing the module by the spec's kind is the registry of dataset kinds' (:mod:`solo_d2.kinds`).
"""

from pathlib import Path
from typing import Dict, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from .record import dataset_record

__all__ = [
    "SPEC_FORM",
    "PANOPTIC_SPEC_FORM",
    "LVIS_SPEC_FORM",
    "parse_dataset_spec",
    "resolve_spec_paths",
    "is_registered_with",
]

SPEC_FORM = "NAME=ANNOTATIONS.json:IMAGE_DIR"
PANOPTIC_SPEC_FORM = "NAME=panoptic:PANOPTIC.json:PANOPTIC_PNG_DIR:IMAGE_DIR"
LVIS_SPEC_FORM = "NAME=lvis:ANNOTATIONS.json:IMAGE_DIR"


def parse_dataset_spec(spec: str, kind: str = "", form: str = SPEC_FORM) -> tuple[str, str, str]:
    """Split ``NAME=[KIND:]ANNOTATIONS.json:IMAGE_DIR`` into ``(name, json_file, image_dir)``.

    The name ends at the first ``=``; the image dir starts after the last ``:``, so the
    annotation path may itself contain ``=`` or ``:``.

    Args:
        kind: the prefix the part after ``=`` must start with ("lvis:"), "" for none.
        form: the expected form, for the message.
    """

    def bad(reason: str) -> ValueError:
        return ValueError(f"Bad dataset spec {spec!r}: {reason}; expected the form {form}")

    name, sep, rest = spec.partition("=")
    if not sep:
        raise bad("missing '='")
    name = name.strip()
    if not name:
        raise bad("empty dataset name")
    if not rest.startswith(kind):
        raise bad(f"the part after '=' does not start with {kind!r}")
    rest = rest[len(kind) :]
    if ":" not in rest:
        raise bad("missing ':' between the annotation file and the image directory")
    json_file, image_dir = rest.rsplit(":", 1)
    if not json_file:
        raise bad("empty annotation file")
    if not image_dir:
        raise bad("empty image directory")
    return name, json_file, image_dir


def resolve_spec_paths(
    spec: str, file: tuple[str, str], folders: Sequence[tuple[str, str]]
) -> list[str]:
    """Absolute paths of a dataset spec's annotation file and folders, checked to exist.

    Args:
        file: (what, path) of the annotation file, e.g. ("Annotation file", "ann.json").
        folders: (what, path) of each folder, e.g. [("Image directory", "images/")].
    Returns:
        the resolved paths, the file first.
    Raises:
        FileNotFoundError / NotADirectoryError: one line naming the path, its role and the spec.
    """
    what, path = file
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"{what} {str(resolved)!r} of dataset spec {spec!r} does not exist")
    paths = [str(resolved)]
    for what, path in folders:
        resolved = Path(path).expanduser().resolve()
        if not resolved.exists():
            raise FileNotFoundError(
                f"{what} {str(resolved)!r} of dataset spec {spec!r} does not exist"
            )
        if not resolved.is_dir():
            raise NotADirectoryError(
                f"{what} {str(resolved)!r} of dataset spec {spec!r} is not a directory"
            )
        paths.append(str(resolved))
    return paths


def is_registered_with(name: str, kind: str, files: Dict[str, str], source: str) -> bool:
    """Whether ``name`` is already registered by the dataset kind ``kind`` from the same files
    (registering it again is then a no-op).

    Args:
        files: role -> path, as its :class:`~solo_d2.data.record.DatasetRecord` holds them.
        source: what asks to register it, for the message ("spec '...'").
    Raises:
        ValueError: ``name`` is registered otherwise (other files, another kind, or not by
            solo_d2).
    """
    if name not in DatasetCatalog.list():
        return False
    record = dataset_record(name)
    if record is not None and record.kind == kind and dict(record.files) == files:
        return True
    if record is None:
        meta = MetadataCatalog.get(name)
        old = {key: meta.get(key, None) for key in files}
        shown = ", ".join(f"{key}={value!r}" for key, value in old.items())
    else:
        shown = ", ".join(f"{key}={value!r}" for key, value in record.files.items())
        shown = f"{shown} (a {record.kind} dataset)"
    raise ValueError(
        f"Dataset {name!r} is already registered with {shown}; cannot register it again from "
        f"{source}"
    )
