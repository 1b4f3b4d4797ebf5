"""Loading weights files without running code from them.

A pickle can name any Python callable and have it called while it is read: detectron2's
``DetectionCheckpointer`` reads ``.pkl`` files with :func:`pickle.load`, so a ``.pkl`` given as
``MODEL.WEIGHTS`` could run any command. Here every weights file is read by a loader that only
builds data:

* ``.pkl`` (detectron2 model zoo ``{"model": {name: ndarray}, "__author__": ...}``, Caffe2 /
  Detectron ``{"blobs": {...}}`` and ImageNet backbones ``{name: ndarray}``): a restricted
  unpickler that admits only numpy's array, dtype and scalar reconstruction, ``OrderedDict`` and
  builtin containers and scalars (:data:`ALLOWED_GLOBALS`);
* every other file (``.pth``, ``.pt``, pycls ``.pyth``): ``torch.load(..., weights_only=True)``,
  PyTorch's loader of tensors, containers and primitive types.

Anything else is refused with an :class:`UnsafeCheckpointError` naming the file and what was
refused, before it is called. A file from a trusted source that holds other objects is converted
once by ``tools/convert_trusted_weights.py`` (unsafe on untrusted files: it reads with full
pickle), which writes a ``.pth`` of tensors that loads safely.

:class:`SafeCheckpointer` is detectron2's ``DetectionCheckpointer`` with these loaders; the
trainer's and ``train_net.py --eval-only``'s checkpointers derive from it, and
:func:`solo_d2.engine.load_model` loads with it.
"""

import collections
import logging
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO, Dict, Union
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

__all__ = [
    "ALLOWED_GLOBALS",
    "CONVERT_TOOL",
    "SafeCheckpointer",
    "UnsafeCheckpointError",
    "WeightsUnpickler",
    "load_checkpoint_file",
    "load_torch_file",
]

logger = logging.getLogger(__name__)

# the command that converts a trusted file (tools/ of this checkout)
CONVERT_TOOL = "python tools/convert_trusted_weights.py"

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


def _encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol 0-2 pickles written by Python 3 use it for ``bytes``."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _allowed_globals() -> Dict[tuple, Any]:
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _encode_latin1,
    }
    # numpy 1.x writes numpy.core.*, numpy 2.x numpy._core.*: either loads with either numpy
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = _multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = _numeric._frombuffer  # protocol 5
    # Python 2 pickles (Detectron / Caffe2 model zoo) name the builtins module __builtin__
    for builtins in ("builtins", "__builtin__"):
        for kind in (set, frozenset, bytearray, complex):
            allowed[(builtins, kind.__name__)] = kind
    return allowed


# (module, name) -> the object a weights .pkl may reference; nothing else is looked up
ALLOWED_GLOBALS = _allowed_globals()


class UnsafeCheckpointError(ValueError):
    """A weights file references a Python global that is not weights data: it was refused before
    anything was imported or called."""

    def __init__(self, path: Union[str, Path], refused: str):
        """
        Args:
            path: the file.
            refused: the global, as ``module.name`` (``"posix.system"``).
        """
        super().__init__(
            f"weights file {path} was refused without running it: it references the Python "
            f"global {refused}; weights need only arrays, numbers, strings and containers, and "
            "anything else could run code while the file is read. If the file is from a source "
            f"you trust, convert it once with `{CONVERT_TOOL} {path} OUT.pth` and load OUT.pth"
        )
        self.path = str(path)
        self.refused = refused


class WeightsUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`; any other global raises
    :class:`UnsafeCheckpointError` before it is imported or called."""

    def __init__(self, file: BinaryIO, path: Union[str, Path], **kwargs):
        """
        Args:
            file: the open file.
            path: its name, for errors.
            kwargs: of :class:`pickle.Unpickler` (``encoding="latin1"`` for Python 2 pickles).
        """
        super().__init__(file, **kwargs)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        """The allowed object ``module.name``; anything else is refused."""
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(self.path, f"{module}.{name}") from None


def load_torch_file(path: Union[str, Path], *, trust_pickle: bool = False) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors, containers and
    primitive types only.

    Args:
        trust_pickle: UNSAFE, for trusted files only: ``weights_only=False``, full pickle, which
            runs whatever code the file names.
    Raises:
        UnsafeCheckpointError: PyTorch's weights-only loader refused a global in the file.
        pickle.UnpicklingError: it refused something else (not a torch file, a plain pickle).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        message = str(e)
        if not message.startswith("Weights only load failed"):
            raise
        refused = re.search(r"GLOBAL ([\w.]+)", message)
        if refused:
            raise UnsafeCheckpointError(path, refused.group(1)) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\n", message)
        raise pickle.UnpicklingError(
            f"weights file {path} is no checkpoint PyTorch's weights-only loader reads"
            + (f" ({detail.group(1).strip()})" if detail else "")
        ) from None


def _load_pickle(path: str, trust_pickle: bool) -> Any:
    with PathManager.open(path, "rb") as f:
        if trust_pickle:
            return pickle.load(f, encoding="latin1")
        return WeightsUnpickler(f, path, encoding="latin1").load()


def load_checkpoint_file(path: Union[str, Path], *, trust_pickle: bool = False) -> Dict[str, Any]:
    """Read the local weights file ``path`` as detectron2's ``DetectionCheckpointer`` does, without
    running code from it.

    ``.pkl``: detectron2 model zoo files are returned as they are; other dicts (Caffe2 /
    Detectron ``{"blobs": ...}``, ImageNet backbones) become ``{"model": ..., "__author__":
    "Caffe2", "matching_heuristics": True}`` without ``*_momentum`` blobs. ``.pyth`` (pycls):
    ``{"model": model_state, "__author__": "pycls", "matching_heuristics": True}``. Anything else
    is a torch file: ``{"model": loaded}`` unless it has a ``"model"`` key.

    Args:
        trust_pickle: UNSAFE, for files from a trusted source only: read with full pickle
            (``pickle.load``, ``torch.load(weights_only=False)``), which runs whatever code the
            file names. Only ``tools/convert_trusted_weights.py`` sets it.
    Raises:
        UnsafeCheckpointError: the file references something other than weights data.
        ValueError: a ``.pkl`` or ``.pyth`` file that does not hold weights as expected.
    """
    path = str(path)
    if path.endswith(".pkl"):
        data = _load_pickle(path, trust_pickle)
        if not isinstance(data, dict):
            raise ValueError(f"weights file {path} holds a {type(data).__name__}, not a dict")
        if "model" in data and "__author__" in data:  # detectron2 model zoo format
            logger.info(f"Reading a file from '{data['__author__']}'")
            return data
        # Caffe2 / Detectron model zoo; ImageNet models have no "blobs"
        data = data.get("blobs", data)
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
    loaded = load_torch_file(path, trust_pickle=trust_pickle)
    if path.endswith(".pyth"):  # pycls; no one else seems to use the ".pyth" extension
        if not isinstance(loaded, dict) or "model_state" not in loaded:
            raise ValueError(f"weights file {path}: pycls checkpoints must contain 'model_state'")
        state = {
            k: v for k, v in loaded["model_state"].items() if not k.endswith("num_batches_tracked")
        }
        return {"model": state, "__author__": "pycls", "matching_heuristics": True}
    if not isinstance(loaded, dict) or "model" not in loaded:
        loaded = {"model": loaded}
    return loaded


class SafeCheckpointer(DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer`` whose loads never run code from the file: every file
    is read by :func:`load_checkpoint_file`. detectron2's ``?matching_heuristics=True`` URL query
    still applies (any other query is an error).

    Raises (from ``load`` / ``resume_or_load``):
        UnsafeCheckpointError: the file references something other than weights data.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.query_matching_heuristics = False  # the query of the path being loaded asks for it

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        """detectron2's ``load``, the ``?matching_heuristics=True`` query read here."""
        parsed = urlparse(path) if path else None
        if parsed is None or not parsed.query:
            return super().load(path, *args, **kwargs)
        queries = parse_qs(parsed.query)
        heuristics = queries.pop("matching_heuristics", ["False"]) == ["True"]
        if queries:
            raise ValueError(f"Unsupported query {queries} in checkpoint path {path}")
        self.query_matching_heuristics = heuristics
        try:
            return super().load(path.rsplit("?", 1)[0], *args, **kwargs)
        finally:
            self.query_matching_heuristics = False

    def _load_file(self, filename: str) -> Dict[str, Any]:
        # fvcore: "Load a checkpoint file. Can be overwritten by subclasses to support different
        # formats."
        loaded = load_checkpoint_file(filename)
        if self.query_matching_heuristics:
            loaded["matching_heuristics"] = True
        return loaded
