"""Models of the SOLO family: the instance META_ARCH and its panoptic extension, the variants'
heads, target assignment and the criterion, losses, post-processing, deformable convs and a
ResNet-FPN backbone that runs them without compiled ops."""

from . import backbone as _backbone  # noqa: F401  (registers build_solo_resnet_fpn_backbone)
from .criterion import SOLOCriterion
from .heads import SOLO_HEAD_REGISTRY, build_solo_head, mask_target_strides
from .meta_arch import SOLO, SOLOv2  # registers META_ARCH "SOLO" and its alias "SOLOv2"
from .panoptic import PanopticSOLO, is_panoptic  # registers META_ARCH "PanopticSOLO"

__all__ = [
    "PanopticSOLO",
    "SOLO",
    "SOLOCriterion",
    "SOLOv2",
    "SOLO_HEAD_REGISTRY",
    "build_solo_head",
    "is_panoptic",
    "mask_target_strides",
]
