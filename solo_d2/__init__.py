"""solo_d2: the SOLO family of instance segmentation models for Detectron2."""

from .config import add_solo_config
from .modeling import SOLO, SOLOv2, mask_target_strides  # registers the META_ARCHs

__all__ = ["add_solo_config", "SOLO", "SOLOv2", "mask_target_strides"]
__version__ = "0.1.0"
