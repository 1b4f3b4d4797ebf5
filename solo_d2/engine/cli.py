"""Command-line glue shared by ``train_net.py``, the demo and the tools: the repeatable
``--dataset SPEC`` option and registering what it names.

The spec forms, and registering each, are the dataset kinds' (:mod:`solo_d2.kinds`). The
synthetic shapes datasets are always registered.
"""

import argparse

from ..config import DEFAULT_MAX_IMAGE_PIXELS, load_config
from ..data.shapes import register_shapes
from ..data.shapes_panoptic import register_shapes_panoptic
from ..kinds import dataset_kinds, register_dataset

__all__ = ["register_dataset", "add_dataset_arguments", "register_datasets_from_args"]


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the repeatable ``--dataset SPEC`` option (the forms of the registered dataset kinds)
    to ``parser``."""
    forms = [f"{k.description} {k.spec_form}" for k in dataset_kinds() if k.spec_prefix is not None]
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="SPEC",
        help=f"register a dataset under NAME (repeatable): {', '.join(forms)}; DATASETS.TRAIN / "
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
