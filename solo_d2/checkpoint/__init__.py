"""Checkpoints: kill-safe saving, and loading the checkpoints of other SOLO implementations.

* :mod:`.safe_load`: loading weights files without running code from them
  (:class:`SafeCheckpointer`, :func:`load_checkpoint_file`).
* :mod:`.atomic`: :class:`AtomicCheckpointer`, the safe checkpointer with atomic writes.
* :mod:`.adelaidet`: AdelaiDet's SOLOv2 (aim-uofa/AdelaiDet): its config keys; its checkpoints
  load as they are.
* :mod:`.official`: the official SOLO repository (WXinlong/SOLO, mmdetection v1): key conversion
  of its SOLO, Decoupled SOLO and SOLOv2 checkpoints and of torchvision ImageNet backbones.

:mod:`.official` builds models, so it is imported on use, not here. The parity check against
AdelaiDet's recorded outputs is a developer harness of the repository (``python -m dev.parity``).
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
