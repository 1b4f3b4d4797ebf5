"""Checkpoints: kill-safe saving, safe loading, and AdelaiDet's config keys.

* :mod:`.safe_load`: loading weights files without running code from them
  (:class:`SafeCheckpointer`, :func:`load_checkpoint_file`).
* :mod:`.atomic`: :class:`AtomicCheckpointer`, the safe checkpointer with atomic writes.
* :mod:`.adelaidet`: AdelaiDet's SOLOv2 (aim-uofa/AdelaiDet): its config keys; its checkpoints
  load as they are.

The official SOLO repository's checkpoints are converted by :mod:`solo_d2.model_zoo.official`
(it builds models and reads the model zoo's configs, a layer above this one). The parity check
against AdelaiDet's recorded outputs is a developer harness of the repository
(``python -m dev.parity``).
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
