"""``AtomicCheckpointer``: a :class:`~.safe_load.SafeCheckpointer` with kill-safe writes.

fvcore's ``Checkpointer.save`` writes ``model_XXXXXXX.pth`` in place and then rewrites
``last_checkpoint`` in place: a process killed during either write leaves a truncated checkpoint
(overwriting ``model_final.pth`` of an earlier run destroys it) or an empty ``last_checkpoint``,
which makes ``--resume`` fail. fvcore's checkpointer does all its file I/O through its public
``path_manager`` attribute; here that is an :class:`AtomicPathManager`, whose ``open`` for writing
is :func:`solo_d2.atomic_io.atomic_open`. fvcore's own ``save`` and ``tag_last_checkpoint`` then
write every file atomically: each file on disk is a complete checkpoint and ``last_checkpoint``
always names one. Loads (``MODEL.WEIGHTS``, ``--resume``) run no code from the file
(:mod:`.safe_load`).
"""

from typing import Any

from ..atomic_io import atomic_open
from .safe_load import SafeCheckpointer

__all__ = ["AtomicCheckpointer", "AtomicPathManager"]


class AtomicPathManager:
    """An iopath ``PathManager`` whose ``open(path, "w" / "wb")`` of a local file writes it
    atomically (:func:`~solo_d2.atomic_io.atomic_open`); every other call (reads, appends,
    ``exists``, ``ls``, remote paths, ...) goes to the wrapped path manager."""

    def __init__(self, path_manager):
        """
        Args:
            path_manager: the path manager to wrap (detectron2's ``PathManager``).
        """
        self.path_manager = path_manager

    def open(self, path: str, mode: str = "r", *args, **kwargs) -> Any:
        if mode in ("w", "wb") and "://" not in str(path):
            if "encoding" in kwargs:
                return atomic_open(path, mode, encoding=kwargs["encoding"])
            return atomic_open(path, mode)
        return self.path_manager.open(path, mode, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "path_manager":  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.path_manager, name)


class AtomicCheckpointer(SafeCheckpointer):
    """SafeCheckpointer whose checkpoint and ``last_checkpoint`` writes are atomic (same
    arguments as detectron2's ``DetectionCheckpointer``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.path_manager = AtomicPathManager(self.path_manager)
