"""Inference helpers of the demo: a batched SOLOv2 predictor and an instance-drawing helper."""

import os
import socket
from typing import List, Optional, Sequence

import cv2
import detectron2.data.transforms as T
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import Metadata, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.file_io import PathManager
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = [
    "WeightsUnavailableError",
    "resolve_weights",
    "class_names",
    "SOLOPredictor",
    "InstanceDrawer",
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
        what = "could not be downloaded from" if remote else "file not found:"
        super().__init__(f"weights {what} {path}" + (f" ({reason})" if reason else ""))
        self.path = path
        self.remote = remote
        self.reason = reason


def resolve_weights(path: str) -> str:
    """The local file of a MODEL.WEIGHTS value, downloading (and caching) remote ones.

    Local paths are returned as they are; ``https://``, ``detectron2://`` ... paths go through
    detectron2's PathManager, which caches downloads under ``$FVCORE_CACHE``
    (``~/.torch/iopath_cache`` by default).

    Raises:
        WeightsUnavailableError: the file does not exist or the download failed.
    """
    remote = "://" in path
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urllib would otherwise wait forever
    try:
        local = PathManager.get_local_path(path)
    except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
        raise WeightsUnavailableError(path, remote, " ".join(str(e).split())) from e
    finally:
        socket.setdefaulttimeout(previous_timeout)
    if not os.path.isfile(local):
        raise WeightsUnavailableError(path, remote)
    return local


def class_names(cfg: CfgNode) -> List[str]:
    """One name per class id: ``thing_classes`` of ``cfg.DATASETS.TEST[0]``, else ``class_<id>``."""
    known = []
    if len(cfg.DATASETS.TEST):
        known = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes", None) or []
    return [known[i] if i < len(known) else f"class_{i}" for i in range(cfg.MODEL.SOLO.NUM_CLASSES)]


class SOLOPredictor:
    """Like detectron2's ``DefaultPredictor``, for a list of images at once.

    Builds the model of ``cfg``, loads ``cfg.MODEL.WEIGHTS`` (no weights when it is empty) and
    runs images resized by ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``. The model groups
    images by padded size itself, so a batch gives the same results as one image at a time.
    """

    def __init__(self, cfg: CfgNode):
        """
        Raises:
            WeightsUnavailableError: MODEL.WEIGHTS is a missing file or could not be downloaded
                (checked before the model is built).
        """
        self.cfg = cfg.clone()
        weights = resolve_weights(cfg.MODEL.WEIGHTS) if cfg.MODEL.WEIGHTS else ""
        self.model = build_model(self.cfg).eval()
        if weights:
            DetectionCheckpointer(self.model).load(weights)
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {self.input_format!r}")

    def __call__(self, images: Sequence[np.ndarray]) -> List[Instances]:
        """
        Args:
            images: (H, W, 3) uint8 images in ``cfg.INPUT.FORMAT`` (what
                ``detectron2.data.detection_utils.read_image(path, format=cfg.INPUT.FORMAT)``
                returns).
        Returns:
            per image, Instances on the CPU at the image's own size, with pred_masks (N, H, W)
            bool, pred_boxes, scores and pred_classes.
        """
        inputs = []
        for image in images:
            height, width = image.shape[:2]
            resized = self.aug.get_transform(image).apply_image(image)
            tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
            inputs.append({"image": tensor, "height": height, "width": width})
        with torch.no_grad():
            outputs = self.model(inputs)
        return [out["instances"].to("cpu") for out in outputs]


class InstanceDrawer:
    """Draws predictions with detectron2's ``Visualizer``, like its demo's ``VisualizationDemo``.

    Instances get their class colour (``ColorMode.SEGMENTATION``) when the metadata has
    ``thing_colors`` for every class, random colours (``ColorMode.IMAGE``) otherwise.
    """

    def __init__(self, names: List[str], colors: Optional[List] = None, input_format: str = "BGR"):
        """
        Args:
            names: class name per class id.
            colors: RGB colour (0-255) per class id, or None.
            input_format: channel order of the images given to :meth:`draw` ("RGB" or "BGR").
        """
        self.metadata = Metadata(name="solo_demo", thing_classes=list(names))
        if colors is not None and len(colors) >= len(names):
            self.metadata.set(thing_colors=[tuple(c) for c in colors])
            self.instance_mode = ColorMode.SEGMENTATION
        else:
            self.instance_mode = ColorMode.IMAGE
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg: CfgNode) -> "InstanceDrawer":
        """A drawer with the class names and colours of ``cfg.DATASETS.TEST[0]``."""
        colors = None
        if len(cfg.DATASETS.TEST):
            colors = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_colors", None)
        return cls(class_names(cfg), colors, cfg.INPUT.FORMAT)

    def draw(self, image: np.ndarray, instances: Instances) -> np.ndarray:
        """Return a BGR uint8 copy of ``image`` (in ``input_format``) with ``instances`` drawn."""
        rgb = image[:, :, ::-1] if self.input_format == "BGR" else image
        visualizer = Visualizer(rgb, self.metadata, instance_mode=self.instance_mode)
        drawn = visualizer.draw_instance_predictions(instances).get_image()
        return np.ascontiguousarray(drawn[:, :, ::-1])

    def save(self, path: str, image: np.ndarray, instances: Instances) -> None:
        """Draw ``instances`` on ``image`` and write it to ``path`` (format from its suffix)."""
        if not cv2.imwrite(path, self.draw(image, instances)):
            raise OSError(f"could not write {path}")
