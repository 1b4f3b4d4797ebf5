"""Synthetic "shapes" instance segmentation dataset in COCO format.

Images of textured circles, rectangles, triangles and stars on noisy grey-ish gradient backgrounds
are generated deterministically from a seed, cached under :func:`datasets_root` and registered with
Detectron2 as ``shapes_train`` and ``shapes_val``. The data exercises what real datasets contain:

* varied image sizes and aspect ratios (short side ``min_size..max_size``, odd sizes included);
* each class has its own hue band (``CLASS_HUES``, +-``HUE_JITTER``): within it every instance
  gets random saturation and brightness and a texture (solid, stripes, checker, noise) of two
  shades, so a class is recognised by its shape and its hue together. (Version 1 of the generator
  drew colours independently of the class; a small model trained from scratch for the 10-minute
  CPU quickstart could not learn classes from shape alone, see docs/quickstart-recipe.md.)
* occlusion: later shapes are drawn on top and each mask is the *visible* part of its shape;
  instances with fewer than ``MIN_VISIBLE_AREA`` visible pixels are dropped;
* object sizes from ``MIN_OBJECT_SIZE`` (16 px) to 80% of the short image side, log-uniform;
* ~10% images without objects, and ``iscrowd=1`` groups of small shapes (uncompressed RLE);
* about half the images store masks as polygons, the others as compressed RLE.

Polygons trace pixel *boundaries* (contours of the 2x-upsampled mask), so pycocotools rasterises
them back to exactly the visible mask; a mask that polygons cannot represent exactly (holes cut
by shapes on top) is stored as RLE. ``area`` and ``bbox`` always come from the stored
segmentation as pycocotools decodes it, so they agree with what loaders see.
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from iopath.common.file_io import file_lock
from pycocotools import mask as mask_util

SHAPES_CLASSES = ("circle", "rectangle", "triangle", "star")
# Centre of each class's hue band, OpenCV hue units (0-180, i.e. degrees / 2): red, yellow-green,
# cyan, violet. Instance colours stay within +-HUE_JITTER of it.
CLASS_HUES = (0, 45, 90, 135)
HUE_JITTER = 10
# RGB colours for visualisation, one per class (the middle of its hue band).
SHAPES_COLORS = ((230, 40, 40), (150, 230, 40), (40, 220, 230), (150, 40, 230))
# name -> (folder, number of images, seed). Images are drawn in sequence from the seed, so the
# first 50 images of shapes_val_large are shapes_val's: the larger split measures the same
# distribution with less noise (shapes_val has only ~10 objects above 96^2 px; README Quickstart).
SPLITS = {
    "shapes_train": ("train", 200, 0),
    "shapes_val": ("val", 50, 1),
    "shapes_val_large": ("val_large", 500, 1),
}
# Bump when the generated content changes, so cached datasets are regenerated.
GENERATOR_VERSION = 2
MIN_VISIBLE_AREA = 20
MIN_OBJECT_SIZE = 16
MAX_OBJECT_FRACTION = 0.8
EMPTY_EVERY = 10  # image i (0-based) is empty when i % EMPTY_EVERY == EMPTY_EVERY - 1
CROWD_EVERY = 8  # image i has a crowd group when i % CROWD_EVERY == 1
TEXTURES = ("solid", "stripes", "checker", "noise")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _hsv_to_bgr(hsv: np.ndarray) -> np.ndarray:
    """(N, 3) float OpenCV HSV (hue 0-180, saturation and value 0-255) -> (N, 3) float BGR."""
    pixels = np.round(hsv).astype(np.uint8)[None]
    return cv2.cvtColor(pixels, cv2.COLOR_HSV2BGR)[0].astype(np.float64)


def _class_colours(rng: np.random.Generator, cls: int, n: int) -> np.ndarray:
    """``n`` BGR colours in the hue band of class ``cls``, saturation >= 120, value >= 110."""
    hue = (CLASS_HUES[cls] + rng.uniform(-HUE_JITTER, HUE_JITTER, n)) % 180
    hsv = np.stack([hue, rng.uniform(120, 255, n), rng.uniform(110, 255, n)], axis=1)
    return _hsv_to_bgr(hsv)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A gradient between two low-saturation colours in a random direction, plus Gaussian noise
    (uint8 BGR)."""
    hsv = np.stack([rng.uniform(0, 180, 2), rng.uniform(0, 60, 2), rng.uniform(40, 220, 2)], 1)
    c0, c1 = _hsv_to_bgr(hsv)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xx * np.cos(angle) + yy * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c0 + t[..., None] * (c1 - c0) + rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _texture(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    """A ``h x w`` BGR patch: solid, stripes, checker or noise in two colours of class ``cls``."""
    c0, c1 = _class_colours(rng, cls, 2)
    kind = TEXTURES[rng.integers(len(TEXTURES))]
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "solid":
        sel = np.zeros((h, w), bool)
    elif kind == "stripes":
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(4, 12)
        sel = ((xx * np.cos(angle) + yy * np.sin(angle)) // (period / 2)) % 2 == 1
    elif kind == "checker":
        cell = int(rng.integers(2, 8))
        sel = (xx // cell + yy // cell) % 2 == 1
    else:
        sel = rng.random((h, w)) < 0.5
    patch = np.where(sel[..., None], c1, c0) + rng.normal(0, 5, (h, w, 3))
    return np.clip(patch, 0, 255).astype(np.uint8)


def _shape_mask(
    rng: np.random.Generator, cls: int, h: int, w: int, cx: float, cy: float, size: float
) -> np.ndarray:
    """Boolean ``h x w`` mask of a shape of class ``cls`` with extent ``size`` around (cx, cy)."""
    m = np.zeros((h, w), np.uint8)
    name = SHAPES_CLASSES[cls]
    rot = rng.uniform(0, 2 * np.pi)
    if name == "circle":
        cv2.circle(m, (round(cx), round(cy)), max(round(size / 2), 2), 1, -1)
    elif name == "rectangle":
        side = size / np.sqrt(2) * rng.uniform(0.9, 1.3)
        box = ((cx, cy), (side, side * rng.uniform(0.6, 1.0)), float(np.degrees(rot)))
        cv2.fillPoly(m, [np.round(cv2.boxPoints(box)).astype(np.int32)], 1)
    else:
        if name == "triangle":
            angles = rot + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.25, 0.25, 3)
            radii = size / 2 * rng.uniform(0.85, 1.0, 3)
        else:  # star
            angles = rot + np.arange(10) * np.pi / 5
            radii = size / 2 * np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.4, 0.55))
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    return m.astype(bool)


def _crowd_mask(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    """Union of 6-14 small shapes of class ``cls`` clustered in one region."""
    cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    spread = rng.uniform(12, 35)
    m = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(6, 15))):
        x, y = cx + rng.normal(0, spread), cy + rng.normal(0, spread)
        m |= _shape_mask(rng, cls, h, w, x, y, rng.uniform(6, 12))
    return m


def _boundary_polygons(mask: np.ndarray) -> list[list[float]]:
    """Polygons along the pixel boundaries of ``mask`` (outer contours only)."""
    up = cv2.resize(mask.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [((c.reshape(-1).astype(np.float64) + 0.5) / 2).tolist() for c in contours]


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE (column-major run lengths, starting with zeros) of ``mask``."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _encode(mask: np.ndarray, iscrowd: bool, polygons: bool) -> tuple[Any, dict[str, Any]]:
    """Return (segmentation, compressed RLE it decodes to) for a visible ``mask``."""
    h, w = mask.shape
    if iscrowd:
        segm = _uncompressed_rle(mask)
        return segm, mask_util.frPyObjects(segm, h, w)
    if polygons:
        polys = _boundary_polygons(mask)
        rle = mask_util.merge(mask_util.frPyObjects(polys, h, w))
        if np.array_equal(mask_util.decode(rle).astype(bool), mask):
            return polys, rle
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}, rle


def _image_layers(
    rng: np.random.Generator, h: int, w: int, empty: bool, crowd: bool
) -> tuple[np.ndarray, list[tuple[int, bool, np.ndarray]]]:
    """Draw one image; return it and its (class, iscrowd, visible mask) layers, bottom first."""
    img = _background(rng, h, w)
    if empty:
        return img, []
    n = int(rng.integers(1, 9))
    crowd_at = int(rng.integers(n + 1)) if crowd else -1
    max_size = MAX_OBJECT_FRACTION * min(h, w)
    layers: list[tuple[int, bool, np.ndarray]] = []
    centers: list[tuple[float, float]] = []
    for i in range(n + (crowd_at >= 0)):
        cls = int(rng.integers(len(SHAPES_CLASSES)))
        if i == crowd_at:
            mask = _crowd_mask(rng, cls, h, w)
        else:
            size = float(np.exp(rng.uniform(np.log(MIN_OBJECT_SIZE), np.log(max_size))))
            if centers and rng.random() < 0.4:  # next to an earlier shape: occlusion
                near = centers[int(rng.integers(len(centers)))]
                cx, cy = (np.array(near) + rng.normal(0, size / 2, 2)).tolist()
            else:
                cx, cy = rng.uniform(size / 4, w - size / 4), rng.uniform(size / 4, h - size / 4)
            centers.append((cx, cy))
            mask = _shape_mask(rng, cls, h, w, cx, cy, size)
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        patch = _texture(rng, cls, y1 - y0, x1 - x0)
        crop = mask[y0:y1, x0:x1]
        img[y0:y1, x0:x1][crop] = patch[crop]
        layers = [(c, k, m & ~mask) for c, k, m in layers] + [(cls, i == crowd_at, mask)]
    return img, layers


def _annotations(
    layers: list[tuple[int, bool, np.ndarray]], image_id: int, next_id: int, polygons: bool
) -> list[dict[str, Any]]:
    """COCO annotations of the visible ``layers``, numbered from ``next_id``."""
    anns = []
    for cls, iscrowd, mask in layers:
        if mask.sum() < MIN_VISIBLE_AREA:
            continue
        segm, rle = _encode(mask, iscrowd, polygons)
        anns.append(
            {
                "id": next_id + len(anns),
                "image_id": image_id,
                "category_id": cls + 1,
                "segmentation": segm,
                "area": float(mask_util.area(rle)),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "iscrowd": int(iscrowd),
            }
        )
    return anns


def generate_shapes(
    out_dir: str,
    split: str,
    num_images: int,
    seed: int,
    min_size: int = 160,
    max_size: int = 256,
) -> str:
    """Generate (or reuse) ``out_dir/<split>/*.png`` and ``out_dir/<split>.json``; return the json.

    Image short sides are drawn from ``[min_size, max_size]``, aspect ratios from ``[1, 1.6]``.
    The same arguments always give byte-identical files; when ``<split>.json`` already exists
    with the same parameters (its ``info``) and all its images exist, nothing is written.
    """
    root = Path(out_dir)
    json_path = root / f"{split}.json"
    image_dir = root / split
    info = {
        "description": "solo_d2 synthetic shapes",
        "generator_version": GENERATOR_VERSION,
        "split": split,
        "num_images": num_images,
        "seed": seed,
        "min_size": min_size,
        "max_size": max_size,
    }
    image_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(str(json_path)):  # one generating process at a time (e.g. DDP workers)
        if _is_cached(json_path, image_dir, info):
            return str(json_path)
        rng = np.random.default_rng(seed)
        images, annotations = [], []
        for i in range(num_images):
            h, w = random_image_size(rng, min_size, max_size)
            empty = i % EMPTY_EVERY == EMPTY_EVERY - 1
            img, layers = _image_layers(rng, h, w, empty, crowd=i % CROWD_EVERY == 1)
            polygons = bool(rng.random() < 0.5)
            file_name = f"{i:06d}.png"
            _atomic_write(image_dir / file_name, cv2.imencode(".png", img)[1].tobytes())
            images.append({"id": i + 1, "file_name": file_name, "height": h, "width": w})
            annotations += _annotations(layers, i + 1, len(annotations) + 1, polygons)
        coco = {
            "info": info,
            "images": images,
            "annotations": annotations,
            "categories": [
                {"id": i + 1, "name": name, "supercategory": "shape"}
                for i, name in enumerate(SHAPES_CLASSES)
            ],
        }
        _atomic_write(json_path, json.dumps(coco, separators=(",", ":")).encode("utf-8"))
    return str(json_path)


def random_image_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) of a generated image: short side in [min_size, max_size], aspect ratio 1-1.6,
    portrait or landscape with equal odds."""
    short = int(rng.integers(min_size, max_size + 1))
    long = int(round(short * rng.uniform(1.0, 1.6)))
    return (short, long) if rng.random() < 0.5 else (long, short)


def _is_cached(json_path: Path, image_dir: Path, info: dict[str, Any]) -> bool:
    """Whether ``json_path`` was generated with ``info`` and all its images exist."""
    try:
        with open(json_path, encoding="utf-8") as f:
            coco = json.load(f)
    except (OSError, ValueError):
        return False
    return coco.get("info") == info and all(
        (image_dir / im["file_name"]).is_file() for im in coco["images"]
    )


def datasets_root() -> str:
    """Where the generated datasets (shapes, shapes_panoptic) go, as an absolute path:
    ``$SOLO_D2_DATASETS`` if set, else ``./datasets`` of the current working directory. Never
    inside the installed package."""
    return os.path.abspath(os.environ.get("SOLO_D2_DATASETS") or "datasets")


def _load_split(name: str, out_dir: str, split: str, num_images: int, seed: int) -> list[dict]:
    """Generate the split if needed and load it as Detectron2 dataset dicts."""
    json_file = generate_shapes(out_dir, split, num_images, seed)
    return load_coco_json(json_file, os.path.join(out_dir, split), name)


def register_shapes(root: Optional[str] = None) -> None:
    """Register ``shapes_train`` (200 images, seed 0), ``shapes_val`` (50, seed 1) and
    ``shapes_val_large`` (500, seed 1: ``shapes_val`` and 450 more images).

    Files go to ``<root>/shapes/{train,val,val_large}{.json,/}``, ``root`` defaulting to
    :func:`datasets_root` (``$SOLO_D2_DATASETS``, else ``./datasets`` of the current working
    directory, taken when this is called); they are generated on the first
    ``DatasetCatalog.get`` (so the metadata's ``json_file``, which ``COCOEvaluator`` reads, exists
    only after that; ``DefaultTrainer.test`` builds the loader first). Names that are already
    registered are left alone.
    """
    out_dir = os.path.join(root or datasets_root(), "shapes")
    for name, (split, num_images, seed) in SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, partial(_load_split, name, out_dir, split, num_images, seed))
        MetadataCatalog.get(name).set(
            thing_classes=list(SHAPES_CLASSES),
            thing_colors=[list(c) for c in SHAPES_COLORS],
            json_file=os.path.join(out_dir, f"{split}.json"),
            image_root=os.path.join(out_dir, split),
            evaluator_type="coco",
        )
