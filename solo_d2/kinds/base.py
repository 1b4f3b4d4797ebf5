"""What a kind of dataset provides: :class:`DatasetKind`, the base of every kind."""

import math
import os
from typing import Dict, List, Optional, Tuple

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator

from ..config import ConfigError
from ..data.dataset_mapper import SOLODatasetMapper
from ..data.panoptic_mapper import SOLOPanopticDatasetMapper
from ..data.record import dataset_record
from ..modeling import is_panoptic

__all__ = ["DatasetKind"]


class DatasetKind:
    """One kind of dataset (COCO instances, LVIS, COCO panoptic, ...): how a ``--dataset`` spec of
    it is parsed and registered, how its datasets are checked before work starts, mapped,
    evaluated, measured (the fit's trials) and cut into a held-out split.

    A kind is registered with :func:`solo_d2.kinds.register_kind`; from then on ``--dataset``,
    ``train_net.py``'s trainer, the pre-flight check and the fit's trials handle its datasets.
    The methods have the defaults of a COCO-style instance dataset.

    Attributes:
        name: the kind's name, the ``kind`` of the :class:`~solo_d2.data.record.DatasetRecord` of
            the datasets it registers ("coco").
        spec_prefix: what follows ``NAME=`` in its specs ("lvis:"); "" for the kind of specs
            without a prefix (COCO); None for a kind not registered from ``--dataset``.
        spec_form: the spec's form, for messages and ``--help``.
        description: a few words for ``--help`` ("COCO instances").
        evaluator_types: detectron2's ``evaluator_type`` values of datasets registered by others
            (detectron2's builtin datasets, a user's own code) that are of this kind.
        packs: whether its datasets are packed (:mod:`solo_d2.data.packed`) for training.
        metric_name: the name of :meth:`metric` ("mask AP").
        annotation_key: the metadata / record key of its annotation file ("json_file").
    """

    name: str = ""
    spec_prefix: Optional[str] = None
    spec_form: str = ""
    description: str = ""
    evaluator_types: Tuple[str, ...] = ()
    packs: bool = False
    metric_name: str = "mask AP"
    annotation_key: str = "json_file"  # the files' role of its annotation file

    def register(self, spec: str, max_image_pixels: int) -> str:
        """Check and register the dataset of ``spec``; return its name.

        Raises:
            ValueError, OSError: a malformed spec, a missing or unusable file (one line naming
                it).
        """
        raise NotImplementedError(f"dataset kind {self.name!r} is not registered from a spec")

    def adopt(self, name: str) -> None:
        """Make a dataset of this kind that someone else registered (detectron2's builtin
        datasets) usable, before it is checked and used; nothing by default."""

    def files(self, name: str) -> List[Tuple[str, Optional[str]]]:
        """(what, path) of each file or folder the dataset ``name`` is read from, for the
        pre-flight check's message when one is missing."""
        record = dataset_record(name)
        meta = MetadataCatalog.get(name)
        paths = dict(record.files) if record is not None else {}
        return [
            ("annotation file", paths.get("json_file", meta.get("json_file", None))),
            ("image folder", paths.get("image_root", meta.get("image_root", None))),
        ]

    def check(self, cfg: CfgNode, name: str, split: str) -> None:
        """Check the dataset ``name`` of ``DATASETS.<split>`` against ``cfg`` (beyond its class
        count and files, which :func:`solo_d2.engine.preflight.check_config` checks for every
        kind): by default, that a panoptic model does not train on it.

        Raises:
            ConfigError: one line naming the key, the value and the fix.
        """
        if is_panoptic(cfg) and split == "TRAIN":
            raise ConfigError(
                f"MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}, a panoptic model, "
                f"but training dataset {name!r} is not a panoptic dataset; register one with "
                "--dataset NAME=panoptic:PANOPTIC.json:PANOPTIC_PNG_DIR:IMAGE_DIR"
            )

    def build_mapper(self, cfg: CfgNode, is_train: bool):
        """The dataset mapper of its datasets for the model of ``cfg``: by default the model's,
        SOLOPanopticDatasetMapper for a panoptic model (it maps dicts without a PNG as instance
        data), else SOLODatasetMapper."""
        mapper = SOLOPanopticDatasetMapper if is_panoptic(cfg) else SOLODatasetMapper
        return mapper(cfg, is_train)

    def build_evaluator(self, cfg: CfgNode, name: str, output_dir: str) -> DatasetEvaluator:
        """The evaluator of its dataset ``name``, writing into ``output_dir``."""
        raise NotImplementedError(f"dataset kind {self.name!r} has no evaluator")

    def metric(self, results: Dict[str, Dict[str, float]]) -> float:
        """The number the fit's trials compare (:mod:`solo_d2.engine.fit_trials`), from the
        evaluator's results: by default COCO's mask AP; 0 when the evaluation has none (no
        prediction)."""
        return finite_or_zero(results.get("segm", {}).get("AP"))

    def annotation_file(self, name: str) -> Optional[str]:
        """The annotation file a held-out split of ``name`` is cut from (the same format, split
        by image), or None when it has none on record."""
        record = dataset_record(name)
        files = record.files if record is not None else MetadataCatalog.get(name)
        path = files.get(self.annotation_key, None)
        return path if isinstance(path, str) and os.path.isfile(path) else None

    def split_spec(self, name: str, split_name: str, json_file: str) -> str:
        """The spec registering ``split_name``: the dataset ``name`` as the annotation file
        ``json_file`` (a subset of :meth:`annotation_file`) describes it."""
        if self.spec_prefix is None:
            raise ValueError(f"dataset kind {self.name!r} cannot register a split of {name!r}")
        image_root = MetadataCatalog.get(name).image_root
        return f"{split_name}={self.spec_prefix}{json_file}:{image_root}"


def finite_or_zero(value) -> float:
    """``value`` as a float, 0.0 when it is missing or not finite."""
    if value is None or not math.isfinite(float(value)):
        return 0.0
    return float(value)
