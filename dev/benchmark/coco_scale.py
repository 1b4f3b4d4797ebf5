"""Annotation files of COCO train2017's and LVIS v1 train's size and shape, for start-up benchmarks.

COCO train2017: 118,287 images, 860,001 annotations, 80 categories, 448 MB. LVIS v1 train: 100,170
images, 1,270,141 annotations, 1,203 categories (with ``frequency``, ``synset``, ``image_count``,
``instance_count``), images with ``neg_category_ids`` and ``not_exhaustive_category_ids``, ~1.1 GB.
The files written here match those counts; each annotation has 1 to 3 polygons of 4 to 35 points
(LVIS: 4 to 60) with two-decimal coordinates (a mix like COCO's), about 1% are crowd annotations
with an uncompressed RLE (COCO only; LVIS has none). The image directory holds one small JPEG
hard-linked under every file name, so the files exist (the checks look for them) at no disk cost.

COCO panoptic train2017 (``panoptic``): 118,287 images, 80 thing and 53 stuff categories, one
annotation per image with its PNG; here 1 to 21 segments per image (11 on average, ~1.3 M in
all; about 60% things, 1% of those crowd), each with ``id``, ``category_id``, ``iscrowd``,
``bbox`` and ``area``. Each image's PNG is a real 64 x 48 RGB panoptic map holding its segments
(ids 1..k as horizontal bands), hard-linked from one file per segment count.

    python -m dev.benchmark.coco_scale {coco,lvis,panoptic} OUT_DIR [--scale 0.1]
"""

import argparse
import os
from pathlib import Path
from typing import Dict

import numpy as np
import orjson

__all__ = [
    "COCO_TRAIN",
    "LVIS_V1_TRAIN",
    "PANOPTIC_TRAIN",
    "write_coco_like",
    "write_panoptic_like",
]

# (images, annotations, categories) of the real training files
COCO_TRAIN = (118_287, 860_001, 80)
LVIS_V1_TRAIN = (100_170, 1_270_141, 1_203)
PANOPTIC_TRAIN = (118_287, 80, 53)  # images, thing categories, stuff categories

_CHUNK = 20_000  # annotations serialised at a time
_LINKS_PER_FILE = 50_000
# kind -> (fraction of crowd annotations, most points of a polygon): LVIS's outlines are finer
_SHAPE = {"coco": (0.01, 35), "lvis": (0.0, 60)}


def _jpeg_bytes() -> bytes:
    import cv2

    image = np.full((8, 8, 3), 127, dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", image)
    assert ok
    return buf.tobytes()


def _categories(n: int, lvis: bool, rng: np.random.Generator) -> list:
    cats = []
    for i in range(1, n + 1):
        cat = {"id": i, "name": f"category_{i:04d}", "supercategory": "thing"}
        if lvis:
            cat.update(
                frequency=["r", "c", "f"][int(rng.choice(3, p=[0.28, 0.38, 0.34]))],
                synset=f"category_{i:04d}.n.01",
                synonyms=[f"category_{i:04d}"],
                def_=None,
                image_count=int(rng.integers(1, 5000)),
                instance_count=int(rng.integers(1, 50000)),
            )
            cat["def"] = cat.pop("def_") or f"the definition of category {i}"
        cats.append(cat)
    return cats


def _images(n: int, num_categories: int, lvis: bool, rng: np.random.Generator) -> list:
    heights = rng.choice([360, 427, 480, 500, 512, 640], size=n)
    widths = rng.choice([480, 500, 612, 640], size=n)
    images = []
    for i in range(n):
        img = {
            "id": i + 1,
            "file_name": f"{i + 1:012d}.jpg",
            "height": int(heights[i]),
            "width": int(widths[i]),
            "license": 1,
            "coco_url": f"http://images.cocodataset.org/train2017/{i + 1:012d}.jpg",
            "date_captured": "2013-11-14 11:18:45",
        }
        if lvis:
            img["neg_category_ids"] = rng.integers(1, num_categories + 1, size=3).tolist()
            img["not_exhaustive_category_ids"] = rng.integers(
                1, num_categories + 1, size=int(rng.integers(0, 3))
            ).tolist()
        images.append(img)
    return images


def _annotations(
    start: int, n: int, images: list, num_categories: int, crowd: float, max_points: int, rng
):
    """Annotations ``start + 1 .. start + n``: polygons inside their image; some crowd RLEs."""
    sizes = np.array([(img["height"], img["width"]) for img in images], dtype=np.float64)
    image_idx = rng.integers(0, len(images), size=n)
    h, w = sizes[image_idx, 0], sizes[image_idx, 1]
    cx, cy = rng.uniform(0.1, 0.9, size=n) * w, rng.uniform(0.1, 0.9, size=n) * h
    radius = rng.uniform(4, 0.3 * np.minimum(h, w))
    categories = rng.integers(1, num_categories + 1, size=n)
    is_crowd = rng.random(n) < crowd
    parts = rng.choice([1, 2, 3], p=[0.8, 0.15, 0.05], size=n)
    points = rng.integers(4, max_points + 1, size=int(parts.sum()))  # per polygon
    total = int(points.sum())
    owner = np.repeat(np.repeat(np.arange(n), parts), points)  # annotation of each point
    angle = rng.uniform(0, 2 * np.pi, size=total)
    r = radius[owner] * rng.uniform(0.6, 1.0, size=total)
    xs = np.clip(cx[owner] + r * np.cos(angle), 0, w[owner] - 1)
    ys = np.clip(cy[owner] + r * np.sin(angle), 0, h[owner] - 1)
    coords = np.round(np.stack([xs, ys], 1).ravel(), 2).tolist()
    x0, y0 = np.maximum(cx - radius, 0), np.maximum(cy - radius, 0)
    x1, y1 = np.minimum(cx + radius, w - 1), np.minimum(cy + radius, h - 1)
    boxes = np.round(np.stack([x0, y0, x1 - x0, y1 - y0], 1), 2).tolist()
    areas = np.round(0.8 * np.pi * radius * radius, 2).tolist()
    anns, polygon, offset = [], 0, 0
    for k in range(n):
        ann = {
            "id": start + k + 1,
            "image_id": images[int(image_idx[k])]["id"],
            "category_id": int(categories[k]),
            "iscrowd": int(is_crowd[k]),
        }
        polygons = []
        for _ in range(int(parts[k])):
            end = offset + 2 * int(points[polygon])
            polygons.append(coords[offset:end])
            offset, polygon = end, polygon + 1
        if is_crowd[k]:
            hk, wk = int(h[k]), int(w[k])
            runs = rng.integers(1, 40, size=int(rng.integers(20, 200))).tolist()
            runs.append(hk * wk - sum(runs))
            ann["segmentation"] = {"size": [hk, wk], "counts": runs}
        else:
            ann["segmentation"] = polygons
        ann["bbox"] = boxes[k]
        ann["area"] = areas[k]
        anns.append(ann)
    return anns


def write_coco_like(
    out_dir: str, kind: str = "coco", scale: float = 1.0, seed: int = 0
) -> Dict[str, str]:
    """Write ``<out_dir>/<kind>_train_like.json`` and its image directory ``<out_dir>/images``.

    Args:
        kind: "coco" (COCO train2017's counts) or "lvis" (LVIS v1 train's, federated fields).
        scale: fraction of the images and annotations to write (1.0: the real counts).
    Returns:
        {"json_file": ..., "image_root": ...}
    """
    if kind not in ("coco", "lvis"):
        raise ValueError(f"kind must be 'coco' or 'lvis', got {kind!r}")
    lvis = kind == "lvis"
    num_images, num_annotations, num_categories = LVIS_V1_TRAIN if lvis else COCO_TRAIN
    num_images = max(1, round(num_images * scale))
    num_annotations = max(1, round(num_annotations * scale))
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    image_root = out / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    images = _images(num_images, num_categories, lvis, rng)
    jpeg = _jpeg_bytes()
    for i, img in enumerate(images):
        if i % _LINKS_PER_FILE == 0:  # a file system allows ~65,000 links to one file
            seed_image = image_root / f".seed_{i // _LINKS_PER_FILE}.jpg"
            seed_image.write_bytes(jpeg)
        path = image_root / img["file_name"]
        if not path.exists():
            os.link(seed_image, path)
    json_file = out / f"{kind}_train_like.json"
    tmp = json_file.with_suffix(".json.tmp")
    with open(tmp, "wb") as f:
        head = {"info": {"description": f"synthetic {kind} train-sized file"}, "licenses": []}
        f.write(orjson.dumps(head)[:-1])  # without its closing brace
        f.write(b',"categories":' + orjson.dumps(_categories(num_categories, lvis, rng)))
        f.write(b',"images":' + orjson.dumps(images))
        f.write(b',"annotations":[')
        for start in range(0, num_annotations, _CHUNK):
            n = min(_CHUNK, num_annotations - start)
            chunk = orjson.dumps(_annotations(start, n, images, num_categories, *_SHAPE[kind], rng))
            f.write((b"," if start else b"") + chunk[1:-1])
        f.write(b"]}")
    os.replace(tmp, json_file)
    return {"json_file": str(json_file), "image_root": str(image_root)}


def _link_many(folder: Path, names, seed_bytes: bytes, tag: str) -> None:
    """Hard-link ``seed_bytes`` (written once per ``_LINKS_PER_FILE`` names) as each name."""
    for i, name in enumerate(names):
        if i % _LINKS_PER_FILE == 0:  # a file system allows ~65,000 links to one file
            seed = folder / f".seed_{tag}_{i // _LINKS_PER_FILE}"
            seed.write_bytes(seed_bytes)
        path = folder / name
        if not path.exists():
            os.link(seed, path)


def _panoptic_png(num_segments: int, height: int = 48, width: int = 64) -> bytes:
    """A panoptic PNG with segments 1..num_segments as horizontal bands (id in the red byte)."""
    import cv2

    rows = (np.arange(height) * num_segments // height + 1).astype(np.uint8)
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0] = rows[:, None]
    ok, buf = cv2.imencode(".png", rgb[..., ::-1])  # cv2 writes BGR
    assert ok
    return buf.tobytes()


def write_panoptic_like(out_dir: str, scale: float = 1.0, seed: int = 0) -> Dict[str, str]:
    """Write a COCO panoptic train2017-sized dataset (module docstring): ``<out_dir>/
    panoptic_train_like.json``, its PNGs in ``<out_dir>/panoptic`` and images in
    ``<out_dir>/images``.

    Returns:
        {"json_file": ..., "png_dir": ..., "image_root": ...}
    """
    num_images, num_things, num_stuff = PANOPTIC_TRAIN
    num_images = max(1, round(num_images * scale))
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    image_root, png_dir = out / "images", out / "panoptic"
    image_root.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    categories = [
        {"id": i + 1, "name": f"thing{i}", "supercategory": "thing", "isthing": 1}
        for i in range(num_things)
    ] + [
        {"id": 1000 + i, "name": f"stuff{i}", "supercategory": "stuff", "isthing": 0}
        for i in range(num_stuff)
    ]
    counts = rng.integers(1, 22, num_images)
    images = [
        {"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "height": 48, "width": 64}
        for i in range(num_images)
    ]
    _link_many(image_root, [im["file_name"] for im in images], _jpeg_bytes(), "jpg")
    pngs = [f"{i + 1:012d}.png" for i in range(num_images)]
    for k in np.unique(counts).tolist():
        chosen = np.flatnonzero(counts == k)
        _link_many(png_dir, [pngs[i] for i in chosen.tolist()], _panoptic_png(k), f"k{k}")
    annotations = []
    for i, k in enumerate(counts.tolist()):
        thing = rng.random(k) < 0.6
        cats = np.where(
            thing, rng.integers(1, num_things + 1, k), rng.integers(1000, 1000 + num_stuff, k)
        )
        crowd = thing & (rng.random(k) < 0.01)
        band = 48 // k if k <= 48 else 1
        segments = [
            {"id": j + 1, "category_id": int(cats[j]), "iscrowd": int(crowd[j]),
             "bbox": [0, j * band, 64, band], "area": 64 * band}  # fmt: skip
            for j in range(k)
        ]
        annotations.append({"image_id": i + 1, "file_name": pngs[i], "segments_info": segments})
    json_file = out / "panoptic_train_like.json"
    tmp = json_file.with_suffix(".json.tmp")
    data = {"info": {"description": "synthetic COCO panoptic train-sized file"}, "licenses": []}
    data.update(categories=categories, images=images, annotations=annotations)
    tmp.write_bytes(orjson.dumps(data))
    os.replace(tmp, json_file)
    return {"json_file": str(json_file), "png_dir": str(png_dir), "image_root": str(image_root)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["coco", "lvis", "panoptic"])
    parser.add_argument("out_dir")
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.kind == "panoptic":
        paths = write_panoptic_like(args.out_dir, args.scale)
    else:
        paths = write_coco_like(args.out_dir, args.kind, args.scale)
    size = os.path.getsize(paths["json_file"]) / 1e6
    print(f"{paths['json_file']}: {size:.0f} MB; images under {paths['image_root']}")


if __name__ == "__main__":
    main()
