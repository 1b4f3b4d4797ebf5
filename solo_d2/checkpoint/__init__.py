"""Checkpoints: kill-safe saving, and loading the checkpoints of other SOLO implementations.

* :mod:`.safe_load`: loading weights files without running code from them
  (:class:`SafeCheckpointer`, :func:`load_checkpoint_file`).
* :mod:`.atomic`: :class:`AtomicCheckpointer`, the safe checkpointer with atomic writes.
* :mod:`.adelaidet`: AdelaiDet's SOLOv2 (aim-uofa/AdelaiDet): its config keys; its checkpoints
  load as they are.
* :mod:`.official`: the official SOLO repository (WXinlong/SOLO, mmdetection v1): key conversion
  of its SOLO, Decoupled SOLO and SOLOv2 checkpoints and of torchvision ImageNet backbones.
* :mod:`.parity`: this implementation's outputs against AdelaiDet's recorded ones.

:mod:`.official` and :mod:`.parity` build models, so they are imported on use, not here.
"""

from .adelaidet import (
    ADELAIDET_KEY_MAP,
    apply_adelaidet_solov2_config,
    is_adelaidet_solov2_state_dict,
)
from .atomic import AtomicCheckpointer
from .safe_load import SafeCheckpointer, UnsafeCheckpointError, load_checkpoint_file

__all__ = [
    "ADELAIDET_KEY_MAP",
    "AtomicCheckpointer",
    "SafeCheckpointer",
    "UnsafeCheckpointError",
    "apply_adelaidet_solov2_config",
    "is_adelaidet_solov2_state_dict",
    "load_checkpoint_file",
]
