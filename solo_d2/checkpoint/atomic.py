"""``AtomicCheckpointer``: a :class:`~.safe_load.SafeCheckpointer` with kill-safe writes.

fvcore's ``Checkpointer.save`` writes ``model_XXXXXXX.pth`` in place and then rewrites
``last_checkpoint`` in place: a process killed during either write leaves a truncated checkpoint
(overwriting ``model_final.pth`` of an earlier run destroys it) or an empty ``last_checkpoint``,
which makes ``--resume`` fail. Here both go through :func:`solo_d2.atomic_io.atomic_open`, so
every file on disk is a complete checkpoint and ``last_checkpoint`` always names one. Loads
(``MODEL.WEIGHTS``, ``--resume``) run no code from the file (:mod:`.safe_load`).
"""

import os

import torch

from ..atomic_io import atomic_open, atomic_write_text
from .safe_load import SafeCheckpointer

__all__ = ["AtomicCheckpointer"]


class AtomicCheckpointer(SafeCheckpointer):
    """SafeCheckpointer whose checkpoint and ``last_checkpoint`` writes are atomic."""

    def save(self, name: str, **kwargs) -> None:
        """Save the model and checkpointables (and ``kwargs``) to ``<save_dir>/<name>.pth``."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"Checkpoint name {name!r} must be a file name, not a path")
        self.logger.info(f"Saving checkpoint to {save_file}")
        with atomic_open(save_file, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``<save_dir>/last_checkpoint`` at ``last_filename_basename``."""
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)
