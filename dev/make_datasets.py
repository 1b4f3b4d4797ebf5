"""Six small COCO-format instance datasets that differ from the shapes dataset, for checking
configs fitted with ``tools/analyze_dataset.py --fit`` (docs/your_data.md).

    python -m dev.make_datasets --out /tmp/fit_datasets

Each dataset gets ``<out>/<name>/{train,val}.json`` and ``{train,val}/*.jpg``; register them
with ``--dataset <name>_train=<out>/<name>/train.json:<out>/<name>/train``. The outlines are
not the shapes dataset's: ellipses with a hole, many-pointed stars, thin rotated bars and
smooth random blobs, in a per-class hue on a textured background. Masks are the visible parts
(later objects occlude earlier ones), stored as compressed RLE; boxes and areas come from them.

==============  ===========================  =======  ===========================  ===========
name            image size (h x w)           classes  object size (px, long side)  per image
==============  ===========================  =======  ===========================  ===========
vga_crowd       480 x 640 (some portrait)    3        10-120                       8-25
megapixel       700-800 x 1024               1        5-24 (mostly under 16)       20-50
big_objects     300-360 x 400                2        55%-95% of the short side    1-3
many_classes    300 x 400                    22       20-100                       3-8
wide_triangles  240 x 720 (panoramas)        3        8-150                        6-20
xsmall_crosses  128 x 160                    4        12-70                        2-6
zoom_aerial     1152 x 1536                  2        8-32                         30-60
==============  ===========================  =======  ===========================  ===========

The last two of the first six (triangles, crosses, crescents, hexagons; 3:1 panoramas and
thumbnail-sized images) were made after the fit's trial stage, to check it on outlines and image
sizes it was not written on. ``zoom_aerial`` (small objects in 1.8-megapixel images, as aerial
views) was made for tiled training and inference (issue 39); its name sorts last, so the other
datasets' seeds are unchanged.
"""

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_util

OUTLINES = ("ring", "star", "bar", "blob")  # the first four datasets'
NEW_OUTLINES = ("triangle", "cross", "crescent", "hexagon")
MIN_VISIBLE_AREA = 6

# name -> (image size sampler, outlines of the classes, hues per outline, size sampler, count)
DATASETS = {
    "vga_crowd": dict(
        hw=lambda r: (480, 640) if r.random() < 0.8 else (640, 480),
        outlines=("ring", "star", "bar"),
        hues=1,
        size=lambda r, short: math.exp(r.uniform(math.log(10), math.log(120))),
        count=(8, 25),
    ),
    "megapixel": dict(
        hw=lambda r: (int(r.integers(700, 801)), 1024),
        outlines=("blob",),
        hues=1,
        size=lambda r, short: math.exp(r.uniform(math.log(5), math.log(24))),
        count=(20, 50),
    ),
    "big_objects": dict(
        hw=lambda r: (int(r.integers(300, 361)), 400),
        outlines=("ring", "blob"),
        hues=1,
        size=lambda r, short: short * r.uniform(0.55, 0.95),
        count=(1, 3),
    ),
    "many_classes": dict(
        hw=lambda r: (300, 400),
        outlines=OUTLINES,
        hues=6,  # 4 outlines x 6 hue bands = 24 combinations, the first 22 are classes
        size=lambda r, short: math.exp(r.uniform(math.log(20), math.log(100))),
        count=(3, 8),
        num_classes=22,
    ),
    "wide_triangles": dict(
        hw=lambda r: (240, 720),
        outlines=("triangle", "crescent", "cross"),
        hues=1,
        size=lambda r, short: math.exp(r.uniform(math.log(8), math.log(150))),
        count=(6, 20),
    ),
    "xsmall_crosses": dict(
        hw=lambda r: (128, 160),
        outlines=NEW_OUTLINES,
        hues=1,
        size=lambda r, short: math.exp(r.uniform(math.log(12), math.log(70))),
        count=(2, 6),
    ),
    "zoom_aerial": dict(
        hw=lambda r: (1152, 1536),
        outlines=("hexagon", "triangle"),
        hues=1,
        size=lambda r, short: math.exp(r.uniform(math.log(8), math.log(32))),
        count=(30, 60),
    ),
}
SPLITS = {"train": (48, 0), "val": (20, 1)}  # images, seed offset


def _outline_mask(rng, outline: str, h: int, w: int, cx: float, cy: float, size: float):
    """uint8 (h, w) mask of one object of long side ``size`` centred at (cx, cy)."""
    m = np.zeros((h, w), np.uint8)
    angle = rng.uniform(0, 180)
    if outline == "ring":
        axes = (max(int(size / 2), 2), max(int(size / 2 * rng.uniform(0.5, 0.9)), 2))
        cv2.ellipse(m, (int(cx), int(cy)), axes, angle, 0, 360, 1, -1)
        hole = (max(int(axes[0] * 0.45), 1), max(int(axes[1] * 0.45), 1))
        cv2.ellipse(m, (int(cx), int(cy)), hole, angle, 0, 360, 0, -1)
    elif outline == "bar":
        length, width = size, max(size * rng.uniform(0.08, 0.18), 2.0)
        box = cv2.boxPoints(((cx, cy), (length, width), angle))
        cv2.fillPoly(m, [np.round(box).astype(np.int32)], 1)
    elif outline == "crescent":  # a disc with an offset disc cut out
        r = max(int(size / 2), 2)
        cv2.circle(m, (int(cx), int(cy)), r, 1, -1)
        off = rng.uniform(0.35, 0.6) * size
        a = np.deg2rad(angle)
        cv2.circle(m, (int(cx + off * np.cos(a)), int(cy + off * np.sin(a))), r, 0, -1)
    elif outline == "cross":
        arm = max(size * rng.uniform(0.2, 0.35), 2.0)
        for extra in (0, 90):
            box = cv2.boxPoints(((cx, cy), (size, arm), angle + extra))
            cv2.fillPoly(m, [np.round(box).astype(np.int32)], 1)
    elif outline in ("triangle", "hexagon"):
        n = 3 if outline == "triangle" else 6
        t = np.linspace(0, 2 * np.pi, n, endpoint=False) + np.deg2rad(angle)
        pts = np.stack([cx + size / 2 * np.cos(t), cy + size / 2 * np.sin(t)], 1)
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    else:
        n = int(rng.integers(7, 10)) * 2 if outline == "star" else 24
        t = np.linspace(0, 2 * np.pi, n, endpoint=False) + np.deg2rad(angle)
        if outline == "star":
            radius = np.where(np.arange(n) % 2 == 0, 1.0, 0.45) * size / 2
        else:  # smooth blob: a few low-frequency harmonics on a circle
            phase = rng.uniform(0, 2 * np.pi, 3)
            radius = (
                size / 2 * (0.75 + sum(0.08 * np.cos((k + 2) * t + phase[k]) for k in range(3)))
            )
        pts = np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], 1)
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    return m


def _background(rng, h: int, w: int) -> np.ndarray:
    base = rng.uniform(60, 190, 3)
    noise = cv2.resize(rng.normal(0, 25, (h // 16 + 1, w // 16 + 1, 3)), (w, h))
    fine = rng.normal(0, 8, (h, w, 3))
    return np.clip(base + noise + fine, 0, 255)


def make_image(rng, spec: dict, num_classes: int):
    h, w = spec["hw"](rng)
    img = _background(rng, h, w)
    masks, classes = [], []
    diagonal = np.add.outer(np.arange(h), np.arange(w))  # stripes' phase
    for _ in range(int(rng.integers(spec["count"][0], spec["count"][1] + 1))):
        c = int(rng.integers(num_classes))
        outline = spec["outlines"][c % len(spec["outlines"])]
        hue_band = c // len(spec["outlines"])
        size = min(spec["size"](rng, min(h, w)), 0.98 * min(h, w))
        cx, cy = rng.uniform(size / 3, w - size / 3), rng.uniform(size / 3, h - size / 3)
        m = _outline_mask(rng, outline, h, w, cx, cy, size)
        hue = (
            hue_band * 180 // spec["hues"] + 15 * (c % len(spec["outlines"])) + rng.integers(-6, 7)
        ) % 180
        hsv = np.uint8([[[hue, rng.integers(120, 256), rng.integers(120, 256)]]])
        colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)
        shade = colour * rng.uniform(0.7, 0.95)
        stripes = (diagonal // max(int(size / 6), 2)) % 2 == 0
        fill = np.where(stripes[..., None] & (rng.random() < 0.5), shade, colour)
        img = np.where(m[..., None] > 0, fill, img)
        for prev in masks:  # occlusion: earlier objects keep their visible part
            prev &= 1 - m
        masks.append(m)
        classes.append(c)
    anns = []
    for m, c in zip(masks, classes):
        if m.sum() < MIN_VISIBLE_AREA:
            continue
        rle = mask_util.encode(np.asfortranarray(m))
        bbox = [float(v) for v in mask_util.toBbox(rle)]
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append(
            {"segmentation": rle, "bbox": bbox, "area": float(mask_util.area(rle)),
             "category_id": c + 1, "iscrowd": 0}  # fmt: skip
        )
    return img.astype(np.uint8), anns


def make_dataset(name: str, out: Path, seed: int = 0) -> None:
    spec = DATASETS[name]
    num_classes = spec.get("num_classes", len(spec["outlines"]) * spec["hues"])
    categories = [
        {"id": c + 1, "name": f"{spec['outlines'][c % len(spec['outlines'])]}{c}"}
        for c in range(num_classes)
    ]
    for split, (count, offset) in SPLITS.items():
        rng = np.random.default_rng([seed, offset, sorted(DATASETS).index(name)])
        folder = out / name / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            img, anns = make_image(rng, spec, num_classes)
            file_name = f"{i:04d}.jpg"
            cv2.imwrite(str(folder / file_name), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            images.append({"id": i + 1, "file_name": file_name, "height": img.shape[0],
                           "width": img.shape[1]})  # fmt: skip
            for a in anns:
                annotations.append({**a, "id": len(annotations) + 1, "image_id": i + 1})
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (out / name / f"{split}.json").write_text(json.dumps(coco))
        print(f"{name}/{split}: {count} images, {len(annotations)} objects")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the datasets")
    parser.add_argument("--only", nargs="*", choices=sorted(DATASETS), help="make these only")
    args = parser.parse_args()
    for name in args.only or DATASETS:
        make_dataset(name, Path(args.out))


if __name__ == "__main__":
    main()
