"""COCO instance segmentation: ``--dataset NAME=ANNOTATIONS.json:IMAGE_DIR``, COCO mask and box AP.

Also the kind of detectron2's builtin COCO instance datasets and of any dataset registered
without a kind solo_d2 knows (``evaluator_type`` "coco" or none).
"""

from detectron2.config import CfgNode

from ..data.coco import COCO_FORMAT, register_coco_dataset
from ..evaluation import SOLOCOCOEvaluator
from .base import DatasetKind

__all__ = ["COCOKind"]


class COCOKind(DatasetKind):
    """COCO instances (:mod:`solo_d2.data.coco`), evaluated by :class:`SOLOCOCOEvaluator`."""

    name = "coco"
    spec_prefix = COCO_FORMAT.prefix
    spec_form = COCO_FORMAT.spec_form
    description = "COCO instances"
    evaluator_types = ("coco",)
    packs = True

    def register(self, spec: str, max_image_pixels: int) -> str:
        return register_coco_dataset(spec, max_image_pixels)

    def build_evaluator(self, cfg: CfgNode, name: str, output_dir: str):
        return SOLOCOCOEvaluator(name, tasks=("segm", "bbox"), output_dir=output_dir)
