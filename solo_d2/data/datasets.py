"""Register any COCO-format instance segmentation dataset from the command line.

``--dataset NAME=ANNOTATIONS.json:IMAGE_DIR`` registers ``NAME`` in Detectron2's ``DatasetCatalog``
and ``MetadataCatalog`` so that ``DATASETS.TRAIN`` / ``DATASETS.TEST`` can name it. The synthetic
``shapes_train`` / ``shapes_val`` datasets (see :mod:`solo_d2.data.shapes`) are always registered.
"""

import argparse
import json
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .shapes import register_shapes

SPEC_FORM = "NAME=ANNOTATIONS.json:IMAGE_DIR"
COCO_KEYS = ("images", "annotations", "categories")


def parse_dataset_spec(spec: str) -> tuple[str, str, str]:
    """Split ``NAME=ANNOTATIONS.json:IMAGE_DIR`` into ``(name, json_file, image_dir)``.

    The name ends at the first ``=``; the image dir starts after the last ``:``, so the
    annotation path may itself contain ``=`` or ``:``.
    """

    def bad(reason: str) -> ValueError:
        return ValueError(f"Bad dataset spec {spec!r}: {reason}; expected the form {SPEC_FORM}")

    if "=" not in spec:
        raise bad("missing '='")
    name, rest = spec.split("=", 1)
    name = name.strip()
    if not name:
        raise bad("empty dataset name")
    if ":" not in rest:
        raise bad("missing ':' between the annotation file and the image directory")
    json_file, image_dir = rest.rsplit(":", 1)
    if not json_file:
        raise bad("empty annotation file")
    if not image_dir:
        raise bad("empty image directory")
    return name, json_file, image_dir


def _check_coco_json(json_file: Path, spec: str) -> None:
    """Raise ``ValueError`` unless ``json_file`` holds a COCO instances dict."""
    where = f"Annotation file {str(json_file)!r} (dataset spec {spec!r})"
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{where} is not a COCO instances file: its top level is not an object")
    for key in COCO_KEYS:
        if not isinstance(data.get(key), list):
            raise ValueError(
                f"{where} is not a COCO instances file: key {key!r} is missing or not a list"
            )


def register_coco_dataset(spec: str) -> str:
    """Check and register the COCO instances dataset described by ``spec``; return its name.

    Registering a name again with the same files is a no-op; with other files it is an error.
    """
    name, json_str, image_str = parse_dataset_spec(spec)
    json_file = Path(json_str).expanduser().resolve()
    image_root = Path(image_str).expanduser().resolve()
    if not json_file.is_file():
        raise FileNotFoundError(
            f"Annotation file {str(json_file)!r} of dataset spec {spec!r} does not exist"
        )
    if not image_root.exists():
        raise FileNotFoundError(
            f"Image directory {str(image_root)!r} of dataset spec {spec!r} does not exist"
        )
    if not image_root.is_dir():
        raise NotADirectoryError(
            f"Image directory {str(image_root)!r} of dataset spec {spec!r} is not a directory"
        )
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        old = (meta.get("json_file"), meta.get("image_root"))
        if old == (str(json_file), str(image_root)):
            return name
        raise ValueError(
            f"Dataset {name!r} is already registered with json_file={old[0]!r}, "
            f"image_root={old[1]!r}; cannot register it again from spec {spec!r}"
        )
    _check_coco_json(json_file, spec)
    register_coco_instances(name, {}, str(json_file), str(image_root))
    return name


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the repeatable ``--dataset NAME=ANNOTATIONS.json:IMAGE_DIR`` option to ``parser``."""
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar=SPEC_FORM,
        help="register a COCO-format instance segmentation dataset under NAME (repeatable); "
        "DATASETS.TRAIN / DATASETS.TEST can then name it. The synthetic shapes_train and "
        "shapes_val datasets are always available.",
    )


def register_datasets_from_args(args: argparse.Namespace) -> list[str]:
    """Register the shapes datasets and every ``--dataset`` spec; return the spec names."""
    register_shapes()
    return [register_coco_dataset(spec) for spec in (getattr(args, "dataset", None) or [])]
