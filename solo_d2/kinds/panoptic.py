"""COCO panoptic: ``--dataset NAME=panoptic:PANOPTIC.json:PANOPTIC_PNG_DIR:IMAGE_DIR``, PQ and the
things' mask and box AP.

Also the kind of detectron2's builtin ``coco_2017_*_panoptic`` datasets (``evaluator_type``
"coco_panoptic_seg"), re-registered with the project's convention when used
(:func:`solo_d2.data.panoptic.adopt_builtin_panoptic`).
"""

import os

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluators

from ..config import ConfigError
from ..data.panoptic import adopt_builtin_panoptic, panoptic_things_coco, register_panoptic_dataset
from ..data.specs import PANOPTIC_SPEC_FORM
from ..evaluation import SOLOCOCOEvaluator, SOLOPanopticEvaluator
from ..modeling import is_panoptic
from .base import DatasetKind, finite_or_zero

__all__ = ["PanopticKind"]


class PanopticKind(DatasetKind):
    """COCO panoptic (:mod:`solo_d2.data.panoptic`), for ``PanopticSOLO`` models."""

    name = "panoptic"
    spec_prefix = "panoptic:"
    spec_form = PANOPTIC_SPEC_FORM
    description = "COCO panoptic"
    evaluator_types = ("coco_panoptic_seg",)
    packs = True
    metric_name = "PQ"
    annotation_key = "panoptic_json"

    def register(self, spec: str, max_image_pixels: int) -> str:
        return register_panoptic_dataset(spec, max_image_pixels)

    def adopt(self, name: str) -> None:
        adopt_builtin_panoptic([name])

    def files(self, name: str):
        meta = MetadataCatalog.get(name)
        return [
            ("annotation file", meta.get("panoptic_json", None)),
            ("image folder", meta.get("image_root", None)),
            ("PNG folder", meta.get("panoptic_root", None)),
        ]

    def check(self, cfg: CfgNode, name: str, split: str) -> None:
        """A panoptic model's stuff classes against the dataset's."""
        if not is_panoptic(cfg):
            return
        stuff = MetadataCatalog.get(name).get("stuff_classes", [])[1:]  # [0] is "things"
        expected = cfg.MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES
        if len(stuff) != expected:
            raise ConfigError(
                f"MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES is {expected} but dataset {name!r} "
                f"(DATASETS.{split}) has {len(stuff)} stuff categories; set "
                f"MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES {len(stuff)}"
            )

    def build_evaluator(self, cfg: CfgNode, name: str, output_dir: str):
        """PQ, and the things' mask and box AP (as detectron2 evaluates its COCO panoptic
        datasets) with their files in the ``things`` subfolder."""
        if not is_panoptic(cfg):
            raise ValueError(
                f"Dataset {name!r} is a panoptic dataset: evaluating it needs a panoptic model "
                '(MODEL.META_ARCHITECTURE "PanopticSOLO")'
            )
        pq = SOLOPanopticEvaluator(name, output_dir=output_dir)
        things = SOLOCOCOEvaluator(
            name,
            ("segm", "bbox"),
            output_dir=os.path.join(output_dir, "things"),
            ground_truth=panoptic_things_coco,
        )
        return DatasetEvaluators([pq, things])

    def metric(self, results) -> float:
        return finite_or_zero(results.get("panoptic_seg", {}).get("PQ"))

    def split_spec(self, name: str, split_name: str, json_file: str) -> str:
        meta = MetadataCatalog.get(name)
        return f"{split_name}=panoptic:{json_file}:{meta.panoptic_root}:{meta.image_root}"
