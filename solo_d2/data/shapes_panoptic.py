"""Synthetic "shapes" panoptic segmentation dataset in the standard COCO panoptic format.

The instance dataset of :mod:`solo_d2.data.shapes` on a landscape of stuff: every image has a sky
above a wavy horizon, grass and/or sand below it (split by a second wavy boundary) and irregular
water patches on the ground, each stuff class with its own colour family and texture. The shapes
(the 4 thing classes, with their class hues, textures, occlusion and ``iscrowd`` groups, drawn by
:func:`solo_d2.data.shapes._image_layers`) go on top. Like COCO panoptic data it has:

* one segment per thing (its visible part; parts under ``MIN_VISIBLE_AREA`` pixels are void) and
  one per stuff category present; ``iscrowd`` segments for the crowd groups;
* void pixels (id 0): unlabelled thin bands along some horizons, unlabelled frames around some
  images, small unlabelled clutter blobs, and the dropped tiny parts of shapes (and of stuff);
* ~10% images without things;
* segment ids that are random integers in 1..256^3-1 (not 1..n) and non-contiguous category ids
  (things 1, 2, 3, 5; stuff 101, 102, 104, 107), which exercise the loaders' id mappings.

Files: ``<root>/shapes_panoptic/{split}.json``, the JPEG images in ``{split}/`` and the PNG id
maps (id = R + 256 G + 256^2 B) in ``{split}_panoptic/``, an image and its PNG sharing a stem
(``000000.jpg``, ``000000.png``) as in COCO. Generation is deterministic for a seed (byte-identical
files), cached by the JSON's ``info``, atomic and locked, as in :mod:`solo_d2.data.shapes`.
Registered lazily as ``shapes_panoptic_train`` and ``shapes_panoptic_val``.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
from detectron2.data import DatasetCatalog
from iopath.common.file_io import file_lock

from .panoptic import load_panoptic_dicts, panoptic_metadata
from .record import DatasetRecord, set_dataset_record
from .shapes import (
    CROWD_EVERY,
    EMPTY_EVERY,
    GENERATOR_VERSION,
    MIN_VISIBLE_AREA,
    SHAPES_CLASSES,
    SHAPES_COLORS,
    _atomic_write,
    _hsv_to_bgr,
    _image_layers,
    _is_cached,
    datasets_root,
    random_image_size,
)

# Dataset category ids of the thing classes (SHAPES_CLASSES order): deliberately not 1..4.
THING_IDS = (1, 2, 3, 5)
# Stuff categories: name -> (dataset id, RGB visualisation colour). Ids deliberately with gaps.
STUFF = {
    "sky": (101, (120, 170, 230)),
    "grass": (102, (60, 150, 50)),
    "sand": (104, (220, 190, 130)),
    "water": (107, (30, 70, 160)),
}
STUFF_CLASSES = tuple(STUFF)
# Hue range of each stuff class (OpenCV units, 0-180). The thing hue bands (shapes.CLASS_HUES
# +- HUE_JITTER) are 170-10, 35-55, 80-100 and 125-145; sky and water share blue hues but differ
# in saturation, brightness and texture (smooth gradient and clouds vs horizontal ripples).
STUFF_HUES = {"sky": (98, 112), "grass": (58, 75), "sand": (12, 24), "water": (105, 118)}
CATEGORIES = [
    {"id": cid, "name": name, "supercategory": "shape", "isthing": 1, "color": list(color)}
    for cid, name, color in zip(THING_IDS, SHAPES_CLASSES, SHAPES_COLORS)
] + [
    {"id": cid, "name": name, "supercategory": "landscape", "isthing": 0, "color": list(color)}
    for name, (cid, color) in STUFF.items()
]
# name -> (split folder, number of images, seed)
SPLITS = {
    "shapes_panoptic_train": ("train", 200, 10),
    "shapes_panoptic_val": ("val", 50, 11),
}
# Bump when the generated content changes (the shapes generator's version is in ``info`` too).
PANOPTIC_GENERATOR_VERSION = 1
JPEG_QUALITY = 95
VOID = -1  # void in the segment-index maps below


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """``h x w`` float noise in [0, 1] varying over about ``cell`` pixels (upsampled grid)."""
    grid = rng.random((int(h / cell) + 2, int(w / cell) + 2)).astype(np.float32)
    return np.clip(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)


def _colour(rng: np.random.Generator, name: str, sat: tuple, val: tuple) -> np.ndarray:
    """A BGR colour of stuff class ``name``: its hue range, saturation and value in the ranges."""
    hsv = np.array([[rng.uniform(*STUFF_HUES[name]), rng.uniform(*sat), rng.uniform(*val)]])
    return _hsv_to_bgr(hsv)[0]


def _stuff_textures(rng: np.random.Generator, h: int, w: int, horizon: float) -> dict:
    """Full-image float BGR textures of each stuff class (before compositing)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = {}
    # sky: saturated blue at the top, paler towards the horizon; soft white clouds
    top = _colour(rng, "sky", (90, 170), (150, 210))
    low = _colour(rng, "sky", (15, 60), (200, 250))
    t = np.clip(yy / max(horizon, 1.0), 0, 1)[..., None]
    sky = top + t * (low - top)
    if rng.random() < 0.6:
        clouds = np.clip((_smooth_noise(rng, h, w, rng.uniform(12, 30)) - 0.55) * 4, 0, 1)
        sky += clouds[..., None] * (np.array([245.0, 245.0, 245.0]) - sky) * 0.8
    out["sky"] = sky + rng.normal(0, 3, (h, w, 3))
    # grass: vertical blades, noise smeared along columns, in two greens
    dark, light = _colour(rng, "grass", (110, 220), (50, 100)), _colour(
        rng, "grass", (90, 200), (110, 170)
    )
    blades = cv2.blur(rng.random((h, w)).astype(np.float32), (1, int(rng.integers(5, 12))))
    blades = np.clip((blades - 0.5) * 3 + 0.5, 0, 1)[..., None]
    out["grass"] = dark + blades * (light - dark) + rng.normal(0, 4, (h, w, 3))
    # sand: pale beige, fine speckles and low dunes
    base = _colour(rng, "sand", (50, 120), (160, 225))
    angle = rng.uniform(-0.4, 0.4)
    dunes = np.sin((yy * np.cos(angle) + xx * np.sin(angle)) * 2 * np.pi / rng.uniform(20, 50))
    shade = 12 * dunes + rng.normal(0, 9, (h, w))
    out["sand"] = base + shade[..., None] + rng.normal(0, 2, (h, w, 3))
    # water: deep blue with horizontal ripples and a few bright glints
    deep, crest = _colour(rng, "water", (130, 220), (60, 110)), _colour(
        rng, "water", (90, 180), (120, 170)
    )
    period, wavelength = rng.uniform(4, 9), rng.uniform(25, 60)
    phase = (yy + 2.0 * np.sin(xx * 2 * np.pi / wavelength)) * 2 * np.pi / period
    ripples = (0.5 + 0.5 * np.sin(phase))[..., None]
    water = deep + ripples * (crest - deep)
    glints = (_smooth_noise(rng, h, w, 3) > 0.93)[..., None]
    out["water"] = np.where(glints, 0.5 * water + 110, water) + rng.normal(0, 3, (h, w, 3))
    return out


def _wave(rng: np.random.Generator, n: int, length: float, amplitude: float) -> np.ndarray:
    """``n`` samples of an irregular curve: three sinusoids, coarse to fine, of total amplitude
    about ``amplitude`` over ``length`` pixels."""
    s = np.arange(n, dtype=np.float64)
    curve = np.zeros(n)
    for cycles, share in ((rng.uniform(0.3, 1.5), 0.7), (rng.uniform(2, 5), 0.25), (12, 0.05)):
        cycles *= rng.uniform(0.8, 1.2)
        curve += share * amplitude * np.sin(2 * np.pi * cycles * s / length + rng.uniform(0, 7))
    return curve


def _blob(rng: np.random.Generator, h: int, w: int, cx: float, cy: float, rx: float, ry: float):
    """Boolean mask of an irregular blob: an ellipse with a radius perturbed by harmonics."""
    theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    radius = np.ones_like(theta)
    for k in range(2, 6):
        radius += rng.uniform(0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    pts = np.stack([cx + rx * radius * np.cos(theta), cy + ry * radius * np.sin(theta)], 1)
    m = np.zeros((h, w), np.uint8)
    cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    return m.astype(bool)


def _stuff_layout(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(stuff class index per pixel (``STUFF_CLASSES`` order), horizon row per column)."""
    sky, grass, sand, water = range(len(STUFF_CLASSES))
    if rng.random() < 0.15:  # looking down: no sky
        horizon = np.full(w, -10.0)
    else:
        horizon = h * rng.uniform(0.2, 0.5) + _wave(rng, w, w, h * rng.uniform(0.02, 0.08))
    yy, xx = np.mgrid[0:h, 0:w]
    ground = yy > horizon[None, :]
    kind = rng.random()
    if kind < 0.3:
        labels = np.where(ground, grass, sky)
    elif kind < 0.5:
        labels = np.where(ground, sand, sky)
    else:  # grass on one side of a wavy, slanted boundary, sand on the other
        boundary = w * rng.uniform(0.25, 0.75) + (np.arange(h) - h / 2) * rng.uniform(-0.6, 0.6)
        boundary += _wave(rng, h, h, w * rng.uniform(0.01, 0.06))
        left = xx < boundary[:, None]
        left_kind, right_kind = (grass, sand) if rng.random() < 0.5 else (sand, grass)
        labels = np.where(ground, np.where(left, left_kind, right_kind), sky)
    top = max(float(horizon.mean()), 0.0)
    for _ in range(int(rng.choice(3, p=[0.35, 0.45, 0.2]))):
        rx = rng.uniform(0.12, 0.3) * min(h, w)
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(top + 0.1 * (h - top), h)
        labels[_blob(rng, h, w, cx, cy, rx, rx * rng.uniform(0.4, 0.7)) & ground] = water
    return labels, horizon


def _void(rng: np.random.Generator, img: np.ndarray, horizon: np.ndarray) -> np.ndarray:
    """Mask of the unlabelled stuff pixels; paints the clutter blobs into ``img``."""
    h, w = img.shape[:2]
    void = np.zeros((h, w), bool)
    if rng.random() < 0.4 and horizon.max() >= 0:  # the annotator skipped the horizon line
        yy = np.arange(h)[:, None]
        void |= np.abs(yy - horizon[None, :]) <= rng.uniform(1, 2.5)
    if rng.random() < 0.2:  # an unlabelled frame
        b = int(rng.integers(1, 4))
        void[:b] = void[-b:] = True
        void[:, :b] = void[:, -b:] = True
    for _ in range(int(rng.integers(0, 3))):  # small unlabelled grey clutter
        r = rng.uniform(3, 8)
        blob = _blob(rng, h, w, rng.uniform(0, w), rng.uniform(0, h), r, r * rng.uniform(0.5, 1))
        grey = _hsv_to_bgr(
            np.array([[rng.uniform(0, 180), rng.uniform(0, 30), rng.uniform(40, 220)]])
        )
        img[blob] = np.clip(grey[0] + rng.normal(0, 4, (int(blob.sum()), 3)), 0, 255)
        void |= blob
    return void


def _panoptic_image(
    rng: np.random.Generator, h: int, w: int, empty: bool, crowd: bool
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Draw one image. Returns the BGR image, a segment-index map (``VOID`` or an index into the
    segment list) and the segments as (dataset category id, iscrowd)."""
    stuff, horizon = _stuff_layout(rng, h, w)
    textures = _stuff_textures(rng, h, w, float(max(horizon.mean(), 1.0)))
    img = np.zeros((h, w, 3))
    for k, name in enumerate(STUFF_CLASSES):
        img[stuff == k] = textures[name][stuff == k]
    img = np.clip(img, 0, 255).astype(np.uint8)
    index = np.where(_void(rng, img, horizon), VOID, stuff)
    segments = [(STUFF[name][0], 0) for name in STUFF_CLASSES]

    shapes_img, layers = _image_layers(rng, h, w, empty, crowd)
    for cls, iscrowd, visible in layers:  # every drawn pixel is some layer's visible pixel
        img[visible] = shapes_img[visible]
        if visible.sum() < MIN_VISIBLE_AREA:
            index[visible] = VOID
        else:
            index[visible] = len(segments)
            segments.append((THING_IDS[cls], int(iscrowd)))
    for k in range(len(STUFF_CLASSES)):  # tiny stuff remnants are unlabelled as well
        if 0 < np.count_nonzero(index == k) < MIN_VISIBLE_AREA:
            index[index == k] = VOID
    return img, index, segments


def _segment_ids(rng: np.random.Generator, n: int) -> list[int]:
    """``n`` distinct random segment ids in 1..256^3-1."""
    ids: list[int] = []
    while len(ids) < n:
        sid = int(rng.integers(1, 256**3))
        if sid not in ids:
            ids.append(sid)
    return ids


def _encode_segments(
    rng: np.random.Generator, index: np.ndarray, segments: list[tuple[int, int]]
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(PNG id map as BGR uint8, segments_info) of the segments that have pixels."""
    present = [k for k in range(len(segments)) if (index == k).any()]
    ids = _segment_ids(rng, len(present))
    id_map = np.zeros(index.shape, np.int64)
    info = []
    for k, sid in zip(present, ids):
        mask = index == k
        id_map[mask] = sid
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        category_id, iscrowd = segments[k]
        info.append(
            {
                "id": sid,
                "category_id": category_id,
                "iscrowd": iscrowd,
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                "area": int(mask.sum()),
            }
        )
    rgb = np.stack([id_map % 256, id_map // 256 % 256, id_map // 256**2], axis=-1)
    return rgb[..., ::-1].astype(np.uint8), info


def _pngs_exist(json_path: Path, png_dir: Path) -> bool:
    """Whether every annotation's PNG of ``json_path`` exists in ``png_dir``."""
    with open(json_path, encoding="utf-8") as f:
        annotations = json.load(f)["annotations"]
    return all((png_dir / a["file_name"]).is_file() for a in annotations)


def generate_shapes_panoptic(
    out_dir: str,
    split: str,
    num_images: int,
    seed: int,
    min_size: int = 160,
    max_size: int = 256,
) -> str:
    """Generate (or reuse) ``out_dir/<split>.json``, ``out_dir/<split>/*.jpg`` and
    ``out_dir/<split>_panoptic/*.png``; return the JSON's path.

    Image sizes as in :func:`solo_d2.data.shapes.generate_shapes`. The same arguments always give
    byte-identical files; when ``<split>.json`` already has the same ``info`` and all its images
    and PNGs exist, nothing is written.
    """
    root = Path(out_dir)
    json_path = root / f"{split}.json"
    image_dir, png_dir = root / split, root / f"{split}_panoptic"
    info = {
        "description": "solo_d2 synthetic shapes panoptic",
        "generator_version": PANOPTIC_GENERATOR_VERSION,
        "shapes_generator_version": GENERATOR_VERSION,
        "split": split,
        "num_images": num_images,
        "seed": seed,
        "min_size": min_size,
        "max_size": max_size,
    }
    image_dir.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(str(json_path)):  # one generating process at a time (e.g. DDP workers)
        if _is_cached(json_path, image_dir, info) and _pngs_exist(json_path, png_dir):
            return str(json_path)
        rng = np.random.default_rng(seed)
        images, annotations = [], []
        for i in range(num_images):
            h, w = random_image_size(rng, min_size, max_size)
            empty = i % EMPTY_EVERY == EMPTY_EVERY - 1
            img, index, segments = _panoptic_image(rng, h, w, empty, i % CROWD_EVERY == 1)
            id_png, segments_info = _encode_segments(rng, index, segments)
            stem = f"{i:06d}"
            jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1]
            _atomic_write(image_dir / f"{stem}.jpg", jpg.tobytes())
            _atomic_write(png_dir / f"{stem}.png", cv2.imencode(".png", id_png)[1].tobytes())
            images.append({"id": i + 1, "file_name": f"{stem}.jpg", "height": h, "width": w})
            annotations.append(
                {"image_id": i + 1, "file_name": f"{stem}.png", "segments_info": segments_info}
            )
        data = {
            "info": info,
            "images": images,
            "annotations": annotations,
            "categories": CATEGORIES,
        }
        _atomic_write(json_path, json.dumps(data, separators=(",", ":")).encode("utf-8"))
    return str(json_path)


def _load_split(out_dir: str, split: str, num_images: int, seed: int) -> list[dict]:
    """Generate the split if needed and load it as panoptic dataset dicts."""
    json_file = generate_shapes_panoptic(out_dir, split, num_images, seed)
    return load_panoptic_dicts(
        json_file, os.path.join(out_dir, f"{split}_panoptic"), os.path.join(out_dir, split)
    )


def register_shapes_panoptic(root: Optional[str] = None) -> None:
    """Register ``shapes_panoptic_train`` (200 images) and ``shapes_panoptic_val`` (50).

    Files go to ``<root>/shapes_panoptic/``, ``root`` defaulting to
    :func:`~solo_d2.data.shapes.datasets_root` (``$SOLO_D2_DATASETS``, else ``./datasets`` of the
    current working directory); they are generated on the first ``DatasetCatalog.get``, so the
    metadata's ``panoptic_json`` and ``panoptic_root`` (which the panoptic evaluator reads) exist
    only after that. Names that are already registered are left alone.
    """
    out_dir = os.path.join(root or datasets_root(), "shapes_panoptic")
    for name, (split, num_images, seed) in SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, partial(_load_split, out_dir, split, num_images, seed))
        files = {
            "panoptic_json": os.path.join(out_dir, f"{split}.json"),
            "panoptic_root": os.path.join(out_dir, f"{split}_panoptic"),
            "image_root": os.path.join(out_dir, split),
        }
        set_dataset_record(
            name,
            DatasetRecord("panoptic", files),  # generated: no fault to leave out
            **panoptic_metadata(CATEGORIES),
            **files,
            evaluator_type="coco_panoptic_seg",
        )
