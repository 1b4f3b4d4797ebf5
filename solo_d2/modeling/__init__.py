"""Models of the SOLO family: one META_ARCH, the variants' heads, target assignment, losses,
post-processing, deformable convs and a ResNet-FPN backbone that runs them without compiled ops."""

from . import backbone as _backbone  # noqa: F401  (registers build_solo_resnet_fpn_backbone)
from .heads import SOLO_HEAD_REGISTRY, build_solo_head, mask_target_strides
from .meta_arch import SOLO, SOLOv2  # registers META_ARCH "SOLO" and its alias "SOLOv2"

__all__ = ["SOLO", "SOLOv2", "SOLO_HEAD_REGISTRY", "build_solo_head", "mask_target_strides"]
