"""Command-line glue shared by ``train_net.py``, the demo and the tools: the repeatable
``--dataset SPEC`` option and registering what it names.

The spec forms and their parsing are :mod:`solo_d2.data.specs`; each kind is registered by its
own module (:mod:`solo_d2.data.coco`, :mod:`solo_d2.data.panoptic`, :mod:`solo_d2.data.lvis`).
The synthetic shapes datasets are always registered.
"""

import argparse

from ..config import DEFAULT_MAX_IMAGE_PIXELS, load_config
from ..data.coco import register_coco_dataset
from ..data.lvis import register_lvis_dataset
from ..data.panoptic import register_panoptic_dataset
from ..data.shapes import register_shapes
from ..data.shapes_panoptic import register_shapes_panoptic
from ..data.specs import LVIS_SPEC_FORM, PANOPTIC_SPEC_FORM, SPEC_FORM, SPEC_FORMS, spec_kind

__all__ = ["SPEC_FORMS", "register_dataset", "add_dataset_arguments", "register_datasets_from_args"]


def register_dataset(spec: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str:
    """Check and register the dataset of any of the :data:`SPEC_FORMS`; return its name.

    The kind is the prefix after ``NAME=``: ``panoptic:`` and ``lvis:``, else COCO instances.
    """
    register = {
        "panoptic": register_panoptic_dataset,
        "lvis": register_lvis_dataset,
        "coco": register_coco_dataset,
    }[spec_kind(spec)]
    return register(spec, max_image_pixels)


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
    """Register the shapes datasets (instances and panoptic) and every ``--dataset`` spec;
    return the spec names.

    The image size limit of the specs is ``INPUT.MAX_IMAGE_PIXELS`` of the config that
    ``args.config_file`` and ``args.opts`` give (its default without a config file).

    Raises:
        ConfigError: the config cannot be loaded.
        ValueError, OSError: a spec is malformed or names a file that is missing or unusable.
    """
    register_shapes()
    register_shapes_panoptic()
    specs = getattr(args, "dataset", None) or []
    max_pixels = DEFAULT_MAX_IMAGE_PIXELS
    if specs and getattr(args, "config_file", ""):
        max_pixels = load_config(args.config_file, args.opts).INPUT.MAX_IMAGE_PIXELS
    return [register_dataset(spec, max_pixels) for spec in specs]
