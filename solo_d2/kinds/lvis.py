"""LVIS: ``--dataset NAME=lvis:ANNOTATIONS.json:IMAGE_DIR``, LVIS's federated mask and box AP.

Also the kind of detectron2's builtin ``lvis_v1_*`` / ``lvis_v0.5_*`` datasets.
"""

from detectron2.config import CfgNode

from ..data.lvis import LVIS_FORMAT, register_lvis_dataset
from ..evaluation import SOLOLVISEvaluator
from .base import DatasetKind

__all__ = ["LVISKind"]


class LVISKind(DatasetKind):
    """LVIS (:mod:`solo_d2.data.lvis`), evaluated by :class:`SOLOLVISEvaluator`."""

    name = "lvis"
    spec_prefix = LVIS_FORMAT.prefix
    spec_form = LVIS_FORMAT.spec_form
    description = "LVIS"
    evaluator_types = ("lvis",)
    packs = True
    metric_name = "LVIS mask AP"

    def register(self, spec: str, max_image_pixels: int) -> str:
        return register_lvis_dataset(spec, max_image_pixels)

    def build_evaluator(self, cfg: CfgNode, name: str, output_dir: str):
        return SOLOLVISEvaluator(name, cfg, output_dir=output_dir)
