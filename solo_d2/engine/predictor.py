"""Inference models from a config and weights: :func:`load_model`, and :class:`SOLOPredictor`
that runs one on images.

Weights files are read without running code from them
(:class:`~solo_d2.checkpoint.SafeCheckpointer`) and must fit the model of the config: a tensor of
another shape is an error (:class:`BadWeightsError`), not a silently skipped tensor.
"""

import contextlib
import os
import socket
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import detectron2.data.transforms as T
import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.file_io import PathManager
from torch import nn

from ..checkpoint import SafeCheckpointer, UnsafeCheckpointError, load_checkpoint_file
from ..config import load_config, merge_config_opts
from ..modeling.tiling import tile_settings

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "BadWeightsError",
    "SOLOPredictor",
    "WeightsUnavailableError",
    "load_model",
    "load_weights",
    "resolve_weights",
]

# Seconds a socket operation of a weights download may block before the download fails.
DOWNLOAD_TIMEOUT_S = 60


class WeightsUnavailableError(RuntimeError):
    """MODEL.WEIGHTS could not be made a local file: a missing file or a failed download."""

    def __init__(self, path: str, remote: bool, reason: str = ""):
        """
        Args:
            path: the MODEL.WEIGHTS value.
            remote: whether ``path`` is a URL (or another ``scheme://`` path) to download.
            reason: why a download failed, on one line.
        """
        if remote:
            message = f"MODEL.WEIGHTS could not be downloaded from {path}"
        else:
            message = f"MODEL.WEIGHTS {path}: no such file"
        super().__init__(message + (f" ({reason})" if reason else ""))
        self.path = path
        self.remote = remote
        self.reason = reason


class BadWeightsError(ValueError):
    """MODEL.WEIGHTS is a file that cannot be loaded or does not fit the model of the config."""


@contextlib.contextmanager
def _download_timeout(seconds: float) -> Iterator[None]:
    """Give socket operations a default timeout of ``seconds`` while the block runs, unless the
    process already set one; the previous default is restored on exit.

    iopath downloads with ``urllib.request.urlretrieve``, which takes no timeout and would
    otherwise wait forever on a stalled connection; the default timeout is the only way to bound
    it. It is process-wide while it is set, so it is set only around a download.
    """
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def resolve_weights(path: str) -> str:
    """The local file of a MODEL.WEIGHTS value, downloading (and caching) remote ones.

    Local paths are returned as they are; ``https://``, ``detectron2://`` ... paths go through
    detectron2's PathManager, which caches downloads under ``$FVCORE_CACHE``
    (``~/.torch/iopath_cache`` by default); a socket operation of the download that blocks for
    more than :data:`DOWNLOAD_TIMEOUT_S` seconds fails it.

    Raises:
        WeightsUnavailableError: the file does not exist or the download failed.
    """
    remote = "://" in path
    if remote:
        try:
            with _download_timeout(DOWNLOAD_TIMEOUT_S):
                path_local = PathManager.get_local_path(path)
        except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
            raise WeightsUnavailableError(path, remote, " ".join(str(e).split())) from e
    else:
        path_local = path
    if not os.path.isfile(path_local):
        raise WeightsUnavailableError(path, remote)
    return path_local


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _shape_mismatches(
    model: nn.Module, checkpoint: Dict
) -> List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]:
    """(key, shape in the file, shape in the model) of the file's tensors whose model tensor has
    another shape. Keys are compared as detectron2's checkpointer loads them: a ``module.``
    prefix on every key (a DistributedDataParallel save) is dropped; files whose keys it renames
    by heuristics (Caffe2, ImageNet backbones) are not compared."""
    state = checkpoint.get("model")
    if not isinstance(state, dict):
        raise ValueError(f"its 'model' entry is a {type(state).__name__}, not a dict of tensors")
    if checkpoint.get("matching_heuristics"):
        return []
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    own = model.state_dict()
    mismatches = []
    for key, value in state.items():
        if key in own and hasattr(value, "shape"):
            in_file, in_model = tuple(value.shape), tuple(own[key].shape)
            if in_file != in_model:
                mismatches.append((key, in_file, in_model))
    return mismatches


def load_weights(model: nn.Module, path: str, num_classes: Optional[int] = None) -> None:
    """Load the local weights file ``path`` into ``model`` through
    :class:`~solo_d2.checkpoint.SafeCheckpointer`; every tensor of the file that the model has
    must have the model's shape.

    Args:
        num_classes: MODEL.SOLO.NUM_CLASSES of the model's config, named in the error of a shape
            mismatch (the usual cause).
    Raises:
        BadWeightsError: the file is not a readable checkpoint, it references something other
            than weights data (refused before anything in it runs), or a tensor has another
            shape than the model's.
    """
    try:
        mismatches = _shape_mismatches(model, load_checkpoint_file(path))
    except UnsafeCheckpointError as e:
        raise BadWeightsError(str(e)) from e
    except Exception as e:  # torch.load / pickle raise many types on a corrupt file
        raise BadWeightsError(f"weights file {path} cannot be loaded: {_one_line(e)}") from e
    if mismatches:
        key, in_file, in_model = mismatches[0]
        hint = "" if num_classes is None else f" and its MODEL.SOLO.NUM_CLASSES ({num_classes})"
        raise BadWeightsError(
            f"weights file {path} does not fit the model of the config: {key} has shape "
            f"{in_file} in the file but {in_model} in the model ({len(mismatches)} such "
            f"tensors); check the config{hint}"
        )
    try:
        SafeCheckpointer(model).load(path)
    except Exception as e:  # read a second time: the file changed in between
        raise BadWeightsError(f"weights file {path} cannot be loaded: {_one_line(e)}") from e


def load_model(
    config: Union[str, "os.PathLike[str]", CfgNode],
    opts: Sequence[str] = (),
    weights: Optional[str] = None,
    *,
    device: Optional[str] = None,
) -> Tuple[nn.Module, CfgNode]:
    """The inference model of a config, with its weights loaded.

    Args:
        config: a config file (with the SOLO keys), or a config (not modified).
        opts: KEY VALUE overrides, as on the command line.
        weights: the weights to load instead of ``MODEL.WEIGHTS``: a local file, or a URL /
            ``detectron2://`` path downloaded once into detectron2's PathManager cache; ""
            keeps the random initialisation.
        device: the device to build the model on instead of ``MODEL.DEVICE``.
    Returns:
        the model in eval mode on its device, and the frozen config it was built from (with
        ``weights`` and ``device`` in it).
    Raises:
        ConfigError: a missing or malformed config file, an unknown key, a value of a wrong type.
        WeightsUnavailableError: the weights are a missing file or could not be downloaded
            (checked before the model is built).
        BadWeightsError: the weights cannot be loaded or do not fit the model.
    """
    if isinstance(config, CfgNode):
        cfg = config.clone()
        cfg.defrost()
        merge_config_opts(cfg, opts)
    else:
        cfg = load_config(os.fspath(config), opts)
    if weights is not None:
        cfg.MODEL.WEIGHTS = weights
    if device is not None:
        cfg.MODEL.DEVICE = str(device)
    cfg.freeze()
    local = resolve_weights(cfg.MODEL.WEIGHTS) if cfg.MODEL.WEIGHTS else ""
    model = build_model(cfg)
    if local:
        load_weights(model, local, cfg.MODEL.SOLO.NUM_CLASSES)
    return model.eval(), cfg


class SOLOPredictor:
    """Like detectron2's ``DefaultPredictor``, for a list of images at once.

    Builds the model of ``cfg`` with :func:`load_model` (``cfg.MODEL.WEIGHTS``; no weights when
    it is empty) and runs images resized by ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``.
    The model groups images by padded size itself, so a batch gives the same results as one image
    at a time. With ``INPUT.TILE.TEST`` the images go to the model at full resolution: it tiles
    them and resizes the whole image itself (:mod:`solo_d2.modeling.tiling`).
    """

    def __init__(self, cfg: CfgNode):
        """
        Raises:
            ValueError: INPUT.FORMAT is neither "RGB" nor "BGR".
            WeightsUnavailableError: MODEL.WEIGHTS is a missing file or could not be downloaded
                (checked before the model is built).
            BadWeightsError: MODEL.WEIGHTS cannot be loaded or does not fit the model.
        """
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {cfg.INPUT.FORMAT!r}")
        self.model, self.cfg = load_model(cfg)
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        self.tiled = tile_settings(self.cfg) is not None

    def __call__(self, images: Sequence[np.ndarray]) -> List[Instances]:
        """
        Args:
            images: (H, W, 3) uint8 images in ``cfg.INPUT.FORMAT`` (what
                ``solo_d2.data.images.read_image(path, cfg.INPUT.FORMAT)`` returns).
        Returns:
            per image, Instances on the CPU at the image's own size, with pred_masks (N, H, W)
            bool, pred_boxes, scores and pred_classes.
        """
        return [out["instances"] for out in self.predict(images)]

    def predict(self, images: Sequence[np.ndarray]) -> List[Dict]:
        """Like :meth:`__call__`, with the panoptic segmentation of panoptic models.

        Returns:
            per image, a dict with "instances" (what :meth:`__call__` returns) and, when the
            model is panoptic, "panoptic_seg": ((H, W) int32 segment ids on the CPU, 0 for no
            segment; segments_info), the model's merge of its instances and stuff (see
            ``solo_d2.modeling.panoptic.combine_things_and_stuff``). The stuff logits
            ("sem_seg", K + 1 float maps of the image's size) are dropped.
        """
        inputs = []
        for image in images:
            height, width = image.shape[:2]
            if self.tiled:  # full resolution; uint8, resized in the model as it would be here
                tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
            else:
                resized = self.aug.get_transform(image).apply_image(image)
                tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
            inputs.append({"image": tensor, "height": height, "width": width})
        with torch.no_grad():
            outputs = self.model(inputs)
        results = []
        for out in outputs:
            result = {"instances": out["instances"].to("cpu")}
            if "panoptic_seg" in out:
                seg, segments_info = out["panoptic_seg"]
                result["panoptic_seg"] = (seg.to("cpu"), segments_info)
            results.append(result)
        return results
