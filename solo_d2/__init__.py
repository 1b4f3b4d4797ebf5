"""solo_d2: the SOLO family of instance segmentation models for Detectron2."""

from .config import add_solo_config
from .modeling import SOLOv2  # registers the META_ARCH

__all__ = ["add_solo_config", "SOLOv2"]
__version__ = "0.1.0"
