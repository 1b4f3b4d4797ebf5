"""Register datasets from the command line.

``--dataset SPEC`` registers a dataset in Detectron2's ``DatasetCatalog`` and ``MetadataCatalog``
so that ``DATASETS.TRAIN`` / ``DATASETS.TEST`` can name it. Three forms (:data:`SPEC_FORMS`):

* ``NAME=ANNOTATIONS.json:IMAGE_DIR``: COCO instance segmentation (this module);
* ``NAME=panoptic:PANOPTIC.json:PANOPTIC_PNG_DIR:IMAGE_DIR``: COCO panoptic
  (:mod:`solo_d2.data.panoptic`);
* ``NAME=lvis:ANNOTATIONS.json:IMAGE_DIR``: LVIS (:mod:`solo_d2.data.lvis`).

The synthetic shapes datasets (see :mod:`solo_d2.data.shapes`) are always registered.
"""

import argparse
import logging
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..config import load_config
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .shapes import register_shapes
from .validation import check_coco_dict, load_checked_coco, read_coco_json, summarize_faults

logger = logging.getLogger(__name__)

SPEC_FORM = "NAME=ANNOTATIONS.json:IMAGE_DIR"
PANOPTIC_SPEC_FORM = "NAME=panoptic:PANOPTIC.json:PANOPTIC_PNG_DIR:IMAGE_DIR"
LVIS_SPEC_FORM = "NAME=lvis:ANNOTATIONS.json:IMAGE_DIR"
SPEC_FORMS = (SPEC_FORM, PANOPTIC_SPEC_FORM, LVIS_SPEC_FORM)


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


def _load_dataset(name: str, json_file: str, image_root: str, max_image_pixels: int) -> list[dict]:
    """DatasetCatalog loader: the checked dataset dicts (faults were reported at registration)."""
    _, checked, dicts = load_checked_coco(json_file, image_root, max_image_pixels=max_image_pixels)
    if len(checked.faults) != len(MetadataCatalog.get(name).get("data_faults", [])):
        logger.warning(
            f"Dataset {name!r} ({json_file}) changed since it was registered; it now has "
            f"{len(checked.faults)} faults, left out:\n{summarize_faults(checked.faults)}"
        )
    return dicts


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


def is_registered_with(name: str, expected: dict[str, Any], source: str) -> bool:
    """Whether ``name`` is already registered from the same files (registering it again is then
    a no-op).

    Args:
        expected: metadata key -> value the registered dataset must have: its files, e.g.
            {"json_file": ..., "image_root": ...}, and what marks its kind if needed.
        source: what asks to register it, for the message ("spec '...'").
    Raises:
        ValueError: ``name`` is registered with other metadata (files or kind).
    """
    if name not in DatasetCatalog.list():
        return False
    meta = MetadataCatalog.get(name)
    old = {key: meta.get(key, None) for key in expected}
    if old == expected:
        return True
    shown = ", ".join(f"{key}={value!r}" for key, value in old.items())
    raise ValueError(
        f"Dataset {name!r} is already registered with {shown}; cannot register it again from "
        f"{source}"
    )


def warn_instance_faults(name: str, json_file: str, data: dict, checked) -> None:
    """Log the faults a COCO-style check found (annotations and images left out), if any.

    Args:
        data: the annotation file's content; ``checked``: its :class:`CheckedCOCO`-like result
            (``faults``, ``bad_annotations``, ``bad_images``).
    """
    if not checked.faults:
        return
    kept = len(data["annotations"]) - len(checked.bad_annotations)
    logger.warning(
        f"Dataset {name!r} ({json_file}): {len(checked.faults)} faults; left out "
        f"{len(checked.bad_annotations)} of {len(data['annotations'])} annotations and "
        f"{len(checked.bad_images)} of {len(data['images'])} images ({kept} annotations "
        f"kept). Set DATASETS.STRICT True to make them errors in training.\n"
        + summarize_faults(checked.faults)
    )


def register_coco_dataset(spec: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str:
    """Check and register the COCO instances dataset described by ``spec``; return its name.

    The annotation file is checked now (:mod:`solo_d2.data.validation`): a file that cannot be
    used raises ``ValueError`` (an image entry declaring more than ``max_image_pixels`` pixels,
    ``INPUT.MAX_IMAGE_PIXELS``, included); faulty annotations and images (missing image files) are
    logged, counted and named, and left out of the dataset. The metadata gets ``thing_classes``
    at once (so ``MODEL.SOLO.NUM_CLASSES`` can be checked before training) and ``data_faults``,
    the list of :class:`DataFault`.

    Registering a name again with the same files is a no-op; with other files it is an error.
    """
    name, json_str, image_str = parse_dataset_spec(spec)
    json_file, image_root = resolve_spec_paths(
        spec, ("Annotation file", json_str), [("Image directory", image_str)]
    )
    files = {"json_file": json_file, "image_root": image_root}
    if is_registered_with(name, files, f"spec {spec!r}"):
        return name
    data = read_coco_json(json_file, f"(dataset spec {spec!r})")
    checked = check_coco_dict(data, json_file, image_root, max_image_pixels)
    warn_instance_faults(name, json_file, data, checked)
    loader = partial(_load_dataset, name, json_file, image_root, max_image_pixels)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(
        json_file=str(json_file),
        image_root=str(image_root),
        evaluator_type="coco",
        thing_classes=checked.thing_classes,
        thing_dataset_id_to_contiguous_id=checked.id_map,
        data_faults=checked.faults,
    )
    return name


def register_dataset(spec: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str:
    """Check and register the dataset of any of the :data:`SPEC_FORMS`; return its name.

    The kind is the prefix after ``NAME=``: ``panoptic:`` and ``lvis:``, else COCO instances.
    """
    name, _, rest = spec.partition("=")
    kind = rest.split(":", 1)[0]
    if kind == "panoptic":
        from .panoptic import register_panoptic_dataset

        return register_panoptic_dataset(spec, max_image_pixels)
    if kind == "lvis":
        from .lvis import register_lvis_dataset

        return register_lvis_dataset(spec, max_image_pixels)
    return register_coco_dataset(spec, max_image_pixels)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the repeatable ``--dataset SPEC`` option (:data:`SPEC_FORMS`) to ``parser``."""
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="SPEC",
        help=f"register a dataset under NAME (repeatable): COCO instances {SPEC_FORM}, COCO "
        f"panoptic {PANOPTIC_SPEC_FORM} or LVIS {LVIS_SPEC_FORM}; DATASETS.TRAIN / "
        "DATASETS.TEST can then name it. The synthetic shapes datasets are always available.",
    )


def register_datasets_from_args(args: argparse.Namespace) -> list[str]:
    """Register the shapes datasets and every ``--dataset`` spec; return the spec names.

    The image size limit of the specs is ``INPUT.MAX_IMAGE_PIXELS`` of the config that
    ``args.config_file`` and ``args.opts`` give (its default without a config file).

    Raises:
        ConfigError: the config cannot be loaded.
        ValueError, OSError: a spec is malformed or names a file that is missing or unusable.
    """
    register_shapes()
    specs = getattr(args, "dataset", None) or []
    max_pixels = DEFAULT_MAX_IMAGE_PIXELS
    if specs and getattr(args, "config_file", ""):
        max_pixels = load_config(args.config_file, args.opts).INPUT.MAX_IMAGE_PIXELS
    return [register_dataset(spec, max_pixels) for spec in specs]
