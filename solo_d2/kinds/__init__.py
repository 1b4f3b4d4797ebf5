"""The registry of dataset kinds: the one place where a dataset's kind decides what happens.

Each kind (:class:`DatasetKind`) is one module of this package: COCO instances
(:mod:`~solo_d2.kinds.coco`), LVIS (:mod:`~solo_d2.kinds.lvis`) and COCO panoptic
(:mod:`~solo_d2.kinds.panoptic`). detectron2's builtin datasets (and datasets a user's own code
registers) belong to the kind whose ``evaluator_types`` holds their ``evaluator_type``; without
one, COCO instances. A new kind is a subclass of :class:`DatasetKind` registered with
:func:`register_kind`, from anywhere: ``--dataset`` specs with its prefix, the trainer's mapper and
evaluator, the pre-flight check and the fit's trials then handle its datasets.

The data layer below (:mod:`solo_d2.data`) reads, checks and packs the files of each format; the
evaluators (:mod:`solo_d2.evaluation`) measure; a kind puts them together.
"""

from typing import Dict, List

from detectron2.data import MetadataCatalog

from ..config.defaults import DEFAULT_MAX_IMAGE_PIXELS
from ..data.record import dataset_record
from .base import DatasetKind, finite_or_zero
from .coco import COCOKind
from .lvis import LVISKind
from .panoptic import PanopticKind

__all__ = [
    "DatasetKind",
    "finite_or_zero",
    "register_kind",
    "dataset_kinds",
    "get_kind",
    "kind_of_spec",
    "kind_of",
    "register_dataset",
    "spec_forms",
]

_KINDS: Dict[str, DatasetKind] = {}


def register_kind(kind: DatasetKind) -> DatasetKind:
    """Add ``kind`` to the registry; return it.

    Raises:
        ValueError: its name, or its spec prefix, is another kind's already.
    """
    if not kind.name:
        raise ValueError(f"dataset kind {kind!r} has no name")
    for other in _KINDS.values():
        if other.name == kind.name:
            raise ValueError(f"dataset kind {kind.name!r} is registered already")
        if kind.spec_prefix is not None and other.spec_prefix == kind.spec_prefix:
            raise ValueError(
                f"dataset kind {kind.name!r}: spec prefix {kind.spec_prefix!r} is kind "
                f"{other.name!r}'s"
            )
    _KINDS[kind.name] = kind
    return kind


def dataset_kinds() -> List[DatasetKind]:
    """The registered kinds, in registration order."""
    return list(_KINDS.values())


def get_kind(name: str) -> DatasetKind:
    """The registered kind called ``name``.

    Raises:
        KeyError: no such kind, naming the registered ones.
    """
    if name not in _KINDS:
        raise KeyError(f"no dataset kind {name!r}; registered: {', '.join(_KINDS)}")
    return _KINDS[name]


def kind_of_spec(spec: str) -> DatasetKind:
    """The kind a ``--dataset`` spec names: the one whose prefix starts the part after ``NAME=``
    (the longest such prefix), else the kind of specs without a prefix."""
    rest = spec.partition("=")[2]
    prefixed = [k for k in _KINDS.values() if k.spec_prefix and rest.startswith(k.spec_prefix)]
    if prefixed:
        return max(prefixed, key=lambda k: len(k.spec_prefix))
    return next(k for k in _KINDS.values() if k.spec_prefix == "")


def kind_of(name: str) -> DatasetKind:
    """The kind of the registered dataset ``name``: the one that registered it (its
    :class:`~solo_d2.data.record.DatasetRecord`), else the one owning its ``evaluator_type``,
    else COCO instances."""
    record = dataset_record(name)
    if record is not None:
        return get_kind(record.kind)
    evaluator_type = MetadataCatalog.get(name).get("evaluator_type", None)
    for kind in _KINDS.values():
        if evaluator_type in kind.evaluator_types:
            return kind
    return _KINDS["coco"]


def register_dataset(spec: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str:
    """Check and register the dataset of ``spec`` by its kind (:func:`kind_of_spec`); return its
    name."""
    return kind_of_spec(spec).register(spec, max_image_pixels)


def spec_forms() -> List[str]:
    """The spec forms of the kinds registered from ``--dataset``, the one without prefix first."""
    kinds = [k for k in _KINDS.values() if k.spec_prefix is not None]
    return [k.spec_form for k in sorted(kinds, key=lambda k: k.spec_prefix != "")]


for _kind in (COCOKind(), PanopticKind(), LVISKind()):
    register_kind(_kind)
