"""Drawing predictions on images with detectron2's ``Visualizer``: instances, or the panoptic
segmentation of panoptic models (the demo's pictures), downscaled first when an image is large;
and the class names of a config's test dataset.
"""

import math
import os
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import Metadata, MetadataCatalog
from detectron2.structures import Instances
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import ColorMode, Visualizer

from ..atomic_io import atomic_write_bytes

__all__ = [
    "MAX_DRAW_PIXELS",
    "InstanceDrawer",
    "Panoptic",
    "class_names",
    "fit_for_drawing",
    "fit_panoptic_for_drawing",
    "stuff_class_names",
]

# Images larger than this (4 MP) are drawn downscaled to it: detectron2's Visualizer needs
# about 100 bytes per pixel (4.4 GB for an 8000 x 6000 photo). The json keeps full-size masks.
MAX_DRAW_PIXELS = 2560 * 1600
# A panoptic prediction: (H, W) int32 segment ids (0: no segment) and the segments' info dicts.
Panoptic = Tuple[torch.Tensor, List[Dict]]


def class_names(cfg: CfgNode) -> List[str]:
    """One name per class id: ``thing_classes`` of ``cfg.DATASETS.TEST[0]``, else ``class_<id>``."""
    known = []
    if len(cfg.DATASETS.TEST):
        known = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes", None) or []
    return [known[i] if i < len(known) else f"class_{i}" for i in range(cfg.MODEL.SOLO.NUM_CLASSES)]


def _stuff_metadata(cfg: CfgNode, key: str) -> Optional[List]:
    """``key`` ("stuff_classes" or "stuff_colors") of ``cfg.DATASETS.TEST[0]`` as K + 1 entries
    indexed by stuff class (entry 0: the "things" class), or None when the metadata has no such
    list, or one that fits neither convention below.

    Two layouts are understood: the project's (``solo_d2/data/panoptic.py``, detectron2's
    "separated" one), K + 1 entries with "things" first; and detectron2's "standard" one (its
    builtin ``coco_2017_*_panoptic`` before they are re-registered), one list of the C thing
    classes then the K stuff classes.
    """
    if not len(cfg.DATASETS.TEST):
        return None
    known = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get(key, None)
    num_things, num_stuff = cfg.MODEL.SOLO.NUM_CLASSES, cfg.MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES
    if not known:
        return None
    if len(known) == num_stuff + 1:
        return list(known)
    if len(known) == num_things + num_stuff:
        return [known[0]] + list(known[num_things:])  # entry 0 is never drawn nor named
    return None


def stuff_class_names(cfg: CfgNode) -> List[str]:
    """One name per stuff class id of a panoptic model, ``"things"`` at 0 then stuff 1..K:
    ``stuff_classes`` of ``cfg.DATASETS.TEST[0]`` when it has one per class, else ``stuff <id>``.
    """
    num_stuff = cfg.MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES
    known = _stuff_metadata(cfg, "stuff_classes")
    if known is not None:
        return ["things"] + [str(name) for name in known[1:]]
    return ["things"] + [f"stuff {i}" for i in range(1, num_stuff + 1)]


class InstanceDrawer:
    """Draws predictions with detectron2's ``Visualizer``, like its demo's ``VisualizationDemo``.

    Instances get their class colour (``ColorMode.SEGMENTATION``) when the metadata has
    ``thing_colors`` for every class, random colours (``ColorMode.IMAGE``) otherwise. Panoptic
    segmentations (:meth:`draw` with ``panoptic``) are drawn with ``Visualizer.draw_panoptic_seg``:
    stuff in its class colour (``stuff_colors``, else a fixed colour per class), then the thing
    segments as instances.
    """

    def __init__(
        self,
        names: List[str],
        colors: Optional[List] = None,
        input_format: str = "BGR",
        stuff_names: Optional[List[str]] = None,
        stuff_colors: Optional[List] = None,
    ):
        """
        Args:
            names: class name per class id.
            colors: RGB colour (0-255) per class id, or None.
            input_format: channel order of the images given to :meth:`draw` ("RGB" or "BGR").
            stuff_names: name per stuff class id of a panoptic model (0 being "things"), or None
                for an instance model.
            stuff_colors: RGB colour (0-255) per stuff class id, or None.
        """
        self.metadata = Metadata(name="solo_demo", thing_classes=list(names))
        if colors is not None and len(colors) >= len(names):
            self.metadata.set(thing_colors=[tuple(c) for c in colors])
            self.instance_mode = ColorMode.SEGMENTATION
        else:
            self.instance_mode = ColorMode.IMAGE
        if stuff_names is not None:
            if stuff_colors is None or len(stuff_colors) < len(stuff_names):
                palette = colormap(rgb=True, maximum=255)  # fixed: video frames keep colours
                stuff_colors = [palette[i % len(palette)] for i in range(len(stuff_names))]
            self.metadata.set(
                stuff_classes=list(stuff_names),
                stuff_colors=[tuple(float(v) for v in c) for c in stuff_colors],
            )
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg: CfgNode) -> "InstanceDrawer":
        """A drawer with the class names and colours of ``cfg.DATASETS.TEST[0]`` (and its stuff
        classes for a panoptic model)."""
        colors = None
        if len(cfg.DATASETS.TEST):
            colors = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_colors", None)
        return cls(  # the stuff classes are used when a prediction has "panoptic_seg"
            class_names(cfg),
            colors,
            cfg.INPUT.FORMAT,
            stuff_names=stuff_class_names(cfg),
            stuff_colors=_stuff_metadata(cfg, "stuff_colors"),
        )

    def draw(
        self, image: np.ndarray, instances: Instances, panoptic: Optional[Panoptic] = None
    ) -> np.ndarray:
        """Return a BGR uint8 copy of ``image`` (in ``input_format``) with the predictions drawn:
        the panoptic segmentation ``panoptic`` when given (``instances`` are then not drawn:
        its thing segments are the instances the model's merge kept), else ``instances``.

        An image of more than ``MAX_DRAW_PIXELS`` pixels is drawn (and returned) downscaled to
        that many pixels, aspect ratio kept, which bounds the memory the Visualizer needs.
        """
        if panoptic is not None:
            seg, segments_info = panoptic
            image, seg = fit_panoptic_for_drawing(image, seg, MAX_DRAW_PIXELS)
        else:
            image, instances = fit_for_drawing(image, instances, MAX_DRAW_PIXELS)
        rgb = image[:, :, ::-1] if self.input_format == "BGR" else image
        visualizer = Visualizer(rgb, self.metadata, instance_mode=self.instance_mode)
        if panoptic is not None:
            # copies: the Visualizer overwrites their "area" with the drawn (maybe downscaled) one
            output = visualizer.draw_panoptic_seg(seg, [dict(s) for s in segments_info])
        else:
            output = visualizer.draw_instance_predictions(instances)
        return np.ascontiguousarray(output.get_image()[:, :, ::-1])

    def save(
        self,
        path: str,
        image: np.ndarray,
        instances: Instances,
        panoptic: Optional[Panoptic] = None,
    ) -> None:
        """Draw the predictions on ``image`` (see :meth:`draw`) and write it to ``path`` (format
        from its suffix).

        The file is written atomically: it is either absent (or its previous version) or complete.
        """
        drawn = self.draw(image, instances, panoptic)
        ok, encoded = cv2.imencode(os.path.splitext(path)[1], drawn)
        if not ok:
            raise OSError(f"could not encode the visualisation of {path}")
        atomic_write_bytes(path, encoded.tobytes())


def _drawing_size(height: int, width: int, max_pixels: int) -> Optional[Tuple[int, int]]:
    """(width, height) (cv2 order) of a ``height`` x ``width`` image downscaled to at most
    ``max_pixels`` pixels, aspect ratio kept; None when it has no more than that."""
    if height * width <= max_pixels:
        return None
    scale = math.sqrt(max_pixels / (height * width))
    return max(1, int(width * scale)), max(1, int(height * scale))


def fit_for_drawing(
    image: np.ndarray, instances: Instances, max_pixels: int
) -> Tuple[np.ndarray, Instances]:
    """``image`` and ``instances`` downscaled to at most ``max_pixels`` pixels (else unchanged).

    Masks are resized one at a time (nearest neighbour), so no full-size copy of them is made.
    """
    h, w = image.shape[:2]
    size = _drawing_size(h, w, max_pixels)
    if size is None:
        return image, instances
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    out = Instances((size[1], size[0]))
    for name, value in instances.get_fields().items():
        if name == "pred_masks":
            masks = torch.zeros((len(value), size[1], size[0]), dtype=torch.bool)
            for i, mask in enumerate(value):  # one full-size mask at a time, viewed as uint8
                small_mask = cv2.resize(
                    mask.numpy().view(np.uint8), size, interpolation=cv2.INTER_NEAREST
                )
                masks[i] = torch.from_numpy(small_mask.view(bool))
            value = masks
        elif name == "pred_boxes":
            value = value.clone()
            value.scale(size[0] / w, size[1] / h)
        out.set(name, value)
    return small, out


def fit_panoptic_for_drawing(
    image: np.ndarray, seg: torch.Tensor, max_pixels: int
) -> Tuple[np.ndarray, torch.Tensor]:
    """``image`` and its (H, W) int32 segment ids ``seg`` downscaled to at most ``max_pixels``
    pixels (else unchanged).

    The ids are resized with nearest neighbour, as instance masks are by :func:`fit_for_drawing`:
    every pixel keeps the id of a full-size pixel (no blended, made-up ids).
    """
    size = _drawing_size(*image.shape[:2], max_pixels)
    if size is None:
        return image, seg
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    ids = seg.numpy().astype(np.int32, copy=False)
    return small, torch.from_numpy(cv2.resize(ids, size, interpolation=cv2.INTER_NEAREST))
