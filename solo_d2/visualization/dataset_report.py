"""Does a dataset fit a config? Object sizes after the config's resizes against the FPN levels.

SOLO makes an object positive on instance level l when its scale, ``sqrt(w * h)`` of its
**box** in input pixels, lies in ``MODEL.SOLO.FPN_SCALE_RANGES[l]`` (inclusive at both ends;
ranges may overlap, so an object can be positive on two levels), and its class is learnt in the
grid cell of its centre (and its neighbours) on that level's ``NUM_GRIDS[l]`` x ``NUM_GRIDS[l]``
grid (:func:`solo_d2.modeling.targets.assign_grid_targets`). The box is the annotation's
``"bbox"`` (XYWH or XYXY by its ``bbox_mode``) resized with the image, as
:class:`~solo_d2.data.SOLODatasetMapper` gives it to the model (``gt_boxes``; panoptic data: the
segment's ``"bbox"``, the tight box of its mask, which is what the mapper computes). So no mask
is decoded here, for polygons and RLE alike.

:func:`analyze_dataset` computes, for the train resize (``INPUT.MIN_SIZE_TRAIN``,
``MAX_SIZE_TRAIN``, ``MIN_SIZE_TRAIN_SAMPLING``) and the test resize (``MIN_SIZE_TEST``,
``MAX_SIZE_TEST``), with detectron2's ``ResizeShortestEdge`` arithmetic:

* how many objects each level receives, how many fall below the finest level's range, above the
  coarsest one's or between two ranges (in no level), and how many are on two levels;
* how many share their centre cell on a level with another object of the same class, and with
  any object; and how many are **lost to shared cells**: every cell of the object's positive
  region on the level (its centre region at ``SIGMA`` x the box, within the 3 x 3 cells around
  its centre cell, as :func:`solo_d2.modeling.targets.assign_grid_targets` assigns it) is also
  positive for another object, of any class. A cell predicts one category and one mask, so such
  an object has no cell of its own to be detected from (:func:`lost_to_shared_cells`;
  :func:`measure_lost_targets` counts the same with the model's own assignment on the masks);
* how many would be dropped at inference by the area filter even with a perfect mask (the mask
  area at the mask stride must exceed the level's stride; the box area is the upper bound of the
  mask area used here);

and the image sizes, instances per image and per class. The train counts are averages over the
train sizes (``"choice"``: each listed size; ``"range"``: up to ``MAX_TRAIN_SIZES`` sizes evenly
spread over the range), i.e. what one epoch gives in expectation. Grid cells divide the image
padded to ``SIZE_DIVISIBILITY`` (the ResNet-FPN backbones' 32), as one image at test time; a
training batch's canvas, the largest image of the batch padded, is not modelled, nor are
``INPUT.CROP`` crops. Centres are box centres (training uses the mask's centre of mass).

The statistics are computed with vectorised numpy over all objects, one pass per train size and
level; the result is a plain dict (``report.json`` of ``tools/analyze_dataset.py``).
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.config import configurable
from detectron2.structures import BoxMode

__all__ = [
    "SIZE_DIVISIBILITY",
    "resized_shape",
    "train_short_sizes",
    "collect_objects",
    "level_statistics",
    "lost_to_shared_cells",
    "lost_in_positives",
    "measure_lost_targets",
    "analyze_dataset",
    "format_report",
    "plot_scale_histogram",
]

SIZE_DIVISIBILITY = 32  # detectron2's ResNet-FPN pads inputs to res5's stride
MAX_TRAIN_SIZES = 9  # train sizes sampled from a "range" MIN_SIZE_TRAIN
# Warning thresholds (fractions of the objects)
DOMINANT_LEVEL = 0.6  # one level receives more than this share of the (object, level) pairs
MISSED_FRACTION = 0.05  # below the finest range / too small for the area filter
LARGE_FRACTION = 0.01  # above the coarsest range, or between ranges
EMPTY_LEVEL = 0.01  # a level receives less than this
SAME_CELL_FRACTION = 0.05  # a level's objects lost to cells shared with other objects
DEFAULT_SIGMA = 0.2  # SOLOv2's centre region (MODEL.SOLO.SIGMA's default)
MEASURED_IMAGES = 200  # images whose masks measure_lost_targets decodes
MIN_CLASS_INSTANCES = 10


def resized_shape(
    h: np.ndarray, w: np.ndarray, short: int, max_size: int
) -> Tuple[np.ndarray, np.ndarray]:
    """detectron2's ``ResizeShortestEdge.get_output_shape``, vectorised.

    Args:
        h, w: (I,) image heights and widths.
        short: target short side; 0 leaves the images as they are (detectron2's no-op).
        max_size: longest side allowed.
    Returns:
        (I,) int64 new heights and widths.
    """
    h, w = np.asarray(h, dtype=np.float64), np.asarray(w, dtype=np.float64)
    if short == 0:
        return h.astype(np.int64), w.astype(np.int64)
    scale = short / np.minimum(h, w)
    newh, neww = h * scale, w * scale
    longest = np.maximum(newh, neww)
    shrink = np.where(longest > max_size, max_size / longest, 1.0)
    newh, neww = newh * shrink, neww * shrink
    return (newh + 0.5).astype(np.int64), (neww + 0.5).astype(np.int64)


def train_short_sizes(min_sizes: Sequence[int], sampling: str) -> List[int]:
    """The short sides the train resize draws from (``INPUT.MIN_SIZE_TRAIN[_SAMPLING]``)."""
    sizes = [int(s) for s in min_sizes]
    if sampling == "choice":
        return sizes
    if sampling == "range":
        if len(sizes) != 2:
            raise ValueError(
                f"INPUT.MIN_SIZE_TRAIN must be (min, max) with MIN_SIZE_TRAIN_SAMPLING 'range', "
                f"got {tuple(sizes)}"
            )
        n = min(sizes[1] - sizes[0] + 1, MAX_TRAIN_SIZES)
        return sorted({int(round(s)) for s in np.linspace(sizes[0], sizes[1], n)})
    raise ValueError(f"INPUT.MIN_SIZE_TRAIN_SAMPLING must be 'choice' or 'range', got {sampling!r}")


def collect_objects(dicts: List[dict]) -> Dict[str, np.ndarray]:
    """The images and the objects SOLO trains on, as arrays.

    Objects: the non-crowd annotations with a segmentation (COCO, LVIS) or non-crowd thing
    segments (panoptic ``segments_info``), with a box of positive width and height once clipped
    to the image (what the mapper keeps).

    Args:
        dicts: detectron2 dataset dicts ("height", "width", and "annotations" with "bbox",
            "bbox_mode", "category_id", "iscrowd", "segmentation"; or "segments_info").
    Returns:
        image_hw: (I, 2) int64; image: (N,) int64 image index of each object; category: (N,)
            int64 contiguous class; box: (N, 4) float64 XYWH clipped to the image; and counts
            num_crowd, num_without_segmentation, num_empty_box (left out).
    """
    image_hw = np.array([[d["height"], d["width"]] for d in dicts], dtype=np.int64).reshape(-1, 2)
    rows, boxes, modes = [], [], []
    crowd = no_segm = 0
    for i, d in enumerate(dicts):
        if "segments_info" in d:  # panoptic: thing segments, XYWH boxes of their masks
            for s in d["segments_info"]:
                if not s.get("isthing", False):
                    continue
                if s.get("iscrowd", 0):
                    crowd += 1
                    continue
                if "bbox" not in s:
                    no_segm += 1
                    continue
                rows.append((i, s["category_id"]))
                boxes.append(s["bbox"])
                modes.append(int(BoxMode.XYWH_ABS))
            continue
        for a in d.get("annotations", []):
            if a.get("iscrowd", 0):
                crowd += 1
                continue
            segm = a.get("segmentation")
            if segm is None or (isinstance(segm, (list, dict)) and len(segm) == 0):
                no_segm += 1
                continue
            rows.append((i, a["category_id"]))
            boxes.append(a["bbox"])
            modes.append(int(a.get("bbox_mode", BoxMode.XYWH_ABS)))
    rows_a = np.array(rows, dtype=np.int64).reshape(-1, 2)
    box = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    xyxy = np.array(modes, dtype=np.int64) == int(BoxMode.XYXY_ABS)
    box[xyxy, 2:] -= box[xyxy, :2]  # -> XYWH
    unknown = ~np.isin(modes, [int(BoxMode.XYXY_ABS), int(BoxMode.XYWH_ABS)])
    if unknown.any():
        raise ValueError(
            f"{int(unknown.sum())} annotations have a relative bbox_mode; only absolute XYWH "
            "and XYXY boxes are supported"
        )
    # clip to the image, as detectron2's transform_instance_annotations does after resizing
    hw = image_hw[rows_a[:, 0]].astype(np.float64)
    x1 = np.clip(box[:, 0], 0, hw[:, 1])
    y1 = np.clip(box[:, 1], 0, hw[:, 0])
    x2 = np.clip(box[:, 0] + box[:, 2], 0, hw[:, 1])
    y2 = np.clip(box[:, 1] + box[:, 3], 0, hw[:, 0])
    box = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)
    valid = (box[:, 2] > 0) & (box[:, 3] > 0)
    return {
        "image_hw": image_hw,
        "image": rows_a[valid, 0],
        "category": rows_a[valid, 1],
        "box": box[valid],
        "num_crowd": crowd,
        "num_without_segmentation": no_segm,
        "num_empty_box": int((~valid).sum()),
    }


def _shared_cell(keys: np.ndarray) -> np.ndarray:
    """(n,) bool: the key occurs more than once."""
    if len(keys) == 0:
        return np.zeros(0, dtype=bool)
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)] > 1


_OFFSETS = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dtype=np.int64)  # (9, 2)


def _floor_cell(x: np.ndarray, num_grid: int) -> np.ndarray:
    # as assign_grid_targets: floor(x / (1 / S)) in float32
    x = np.asarray(x, dtype=np.float32)
    return np.floor(x / np.float32(1.0 / num_grid)).astype(np.int64)


def lost_to_shared_cells(
    image: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    w: np.ndarray,
    h: np.ndarray,
    canvas_hw: np.ndarray,
    num_grid: int,
    sigma: float,
) -> np.ndarray:
    """Objects of one level whose every positive cell is also positive for another object.

    The positive region is :func:`solo_d2.modeling.targets.assign_grid_targets`'s: the cells hit
    by the ``sigma`` x box around the centre, clamped to the 3 x 3 cells around the centre cell.

    Args:
        image: (n,) int image index of each object (objects of other images never collide).
        cx, cy, w, h: (n,) centre and box size in input pixels.
        canvas_hw: (n, 2) the padded canvas the grid divides, per object.
        num_grid: S of the level.
        sigma: MODEL.SOLO.SIGMA.
    Returns:
        (n,) bool: lost (no cell of its own, any class).
    """
    n = len(image)
    if n == 0:
        return np.zeros(0, dtype=bool)
    s = num_grid
    ch, cw = canvas_hw[:, 0].astype(np.float32), canvas_hw[:, 1].astype(np.float32)
    cx, cy = np.asarray(cx, np.float32), np.asarray(cy, np.float32)
    half_w, half_h = np.float32(0.5 * sigma) * w, np.float32(0.5 * sigma) * h
    col, row = _floor_cell(cx / cw, s), _floor_cell(cy / ch, s)
    top = np.maximum(_floor_cell((cy - half_h) / ch, s).clip(min=0), row - 1)
    down = np.minimum(_floor_cell((cy + half_h) / ch, s).clip(max=s - 1), row + 1)
    left = np.maximum(_floor_cell((cx - half_w) / cw, s).clip(min=0), col - 1)
    right = np.minimum(_floor_cell((cx + half_w) / cw, s).clip(max=s - 1), col + 1)
    r = row[:, None] + _OFFSETS[None, :, 0]  # (n, 9)
    c = col[:, None] + _OFFSETS[None, :, 1]
    inside = (
        (r >= top[:, None]) & (r <= down[:, None]) & (c >= left[:, None]) & (c <= right[:, None])
    )
    keys = (np.asarray(image, np.int64)[:, None] * s + r) * s + c
    shared = np.zeros(inside.shape, dtype=bool)
    shared[inside] = _shared_cell(keys[inside])
    # an empty region (centre outside the canvas) owns nothing either
    return (shared | ~inside).all(1)


def lost_in_positives(positives: np.ndarray, num_instances: int) -> np.ndarray:
    """The same from a level's positives of :func:`~solo_d2.modeling.targets.assign_grid_targets`.

    Args:
        positives: (P, 3) int rows [image, cell, instance] of one level (SOLOv2's assignment: a
            cell appears once per instance covering it).
        num_instances: M.
    Returns:
        (M,) bool: positive on the level and every one of its cells shared with another instance.
    """
    positives = np.asarray(positives, dtype=np.int64).reshape(-1, 3)
    on_level = np.zeros(num_instances, dtype=bool)
    owns = np.zeros(num_instances, dtype=bool)
    if len(positives):
        cell = positives[:, 0] * (positives[:, 1].max() + 1) + positives[:, 1]
        on_level[positives[:, 2]] = True
        owns[positives[~_shared_cell(cell), 2]] = True
    return on_level & ~owns


def level_statistics(
    objects: Dict[str, np.ndarray],
    short: int,
    max_size: int,
    scale_ranges: Sequence[Sequence[float]],
    num_grids: Sequence[int],
    level_strides: Sequence[int],
    mask_stride: int,
    size_divisibility: int = SIZE_DIVISIBILITY,
    sigma: float = DEFAULT_SIGMA,
) -> Dict[str, np.ndarray]:
    """Where the objects go at one resize.

    Args:
        objects: :func:`collect_objects`'s result.
        short, max_size: the resize (``ResizeShortestEdge(short, max_size)``).
        scale_ranges: (L, 2) inclusive (lo, hi) of sqrt(box area) per level.
        num_grids: (L,) grid size S per level.
        level_strides: (L,) instance stride per level (the inference area filter's minimum).
        mask_stride: stride of the soft masks at inference.
        sigma: MODEL.SOLO.SIGMA, the centre region's share of the box.
    Returns:
        scale: (N,) sqrt(w * h) of the resized boxes; on_level: (L, N) bool; per_level,
        same_class_same_cell, same_cell_any_class, lost_targets (:func:`lost_to_shared_cells`),
        too_small_for_area_filter: (L,) int64 (the last counts each object on its finest
        level); below_finest / above_coarsest: objects smaller / larger than every range;
        between_levels: in no range otherwise; on_two_levels: objects in two or more ranges.
    """
    hw = objects["image_hw"]
    newh, neww = resized_shape(hw[:, 0], hw[:, 1], short, max_size)
    sy, sx = newh / np.maximum(hw[:, 0], 1), neww / np.maximum(hw[:, 1], 1)  # (I,)
    img, box = objects["image"], objects["box"]
    w, h = box[:, 2] * sx[img], box[:, 3] * sy[img]
    scale = np.sqrt(w * h)
    cx = (box[:, 0] + box[:, 2] / 2) * sx[img]
    cy = (box[:, 1] + box[:, 3] / 2) * sy[img]
    div = size_divisibility
    canvas_h = -(-newh // div) * div
    canvas_w = -(-neww // div) * div
    ranges = np.asarray(scale_ranges, dtype=np.float64).reshape(-1, 2)
    on_level = (scale[None] >= ranges[:, :1]) & (scale[None] <= ranges[:, 1:])  # (L, N)
    num_classes = int(objects["category"].max()) + 1 if len(scale) else 1
    same_class, same_any, lost, too_small = [], [], [], []
    canvas = np.stack([canvas_h, canvas_w], axis=1)[img]  # (N, 2)
    finest_level = np.where(on_level.any(0), on_level.argmax(0), -1)
    box_area_at_mask_stride = w * h / mask_stride**2
    for level, s in enumerate(num_grids):
        sel = on_level[level]
        col = np.minimum(np.floor(cx[sel] / canvas_w[img[sel]] * s), s - 1).astype(np.int64)
        row = np.minimum(np.floor(cy[sel] / canvas_h[img[sel]] * s), s - 1).astype(np.int64)
        cell = img[sel] * s * s + row * s + col
        same_any.append(int(_shared_cell(cell).sum()))
        same_class.append(int(_shared_cell(cell * num_classes + objects["category"][sel]).sum()))
        args = (img[sel], cx[sel], cy[sel], w[sel], h[sel], canvas[sel], s, sigma)
        lost.append(int(lost_to_shared_cells(*args).sum()))
        first = finest_level == level
        too_small.append(int((box_area_at_mask_stride[first] <= level_strides[level]).sum()))
    in_any = on_level.any(0)
    lowest, highest = ranges[:, 0].min(), ranges[:, 1].max()
    return {
        "scale": scale,
        "on_level": on_level,
        "per_level": on_level.sum(1),
        "below_finest": int((scale < lowest).sum()),
        "above_coarsest": int((scale > highest).sum()),
        "between_levels": int((~in_any & (scale >= lowest) & (scale <= highest)).sum()),
        "on_two_levels": int((on_level.sum(0) >= 2).sum()),
        "same_class_same_cell": np.array(same_class, dtype=np.int64),
        "same_cell_any_class": np.array(same_any, dtype=np.int64),
        "lost_targets": np.array(lost, dtype=np.int64),
        "too_small_for_area_filter": np.array(too_small, dtype=np.int64),
    }


def measure_lost_targets(
    dicts: List[dict],
    short: int,
    max_size: int,
    scale_ranges: Sequence[Sequence[float]],
    num_grids: Sequence[int],
    sigma: float,
    max_images: int = MEASURED_IMAGES,
    size_divisibility: int = SIZE_DIVISIBILITY,
) -> Dict[str, object]:
    """Targets lost to shared cells, measured with the model's own assignment on the masks.

    What :func:`level_statistics` predicts from boxes ("lost_targets"), counted the way the model
    sees an image at one resize: the annotations rasterised at the resized size (detectron2's
    transforms, as :class:`~solo_d2.data.SOLODatasetMapper`), boxes recomputed from the masks,
    centres of mass, then :func:`~solo_d2.modeling.targets.assign_grid_targets` on the image's
    padded canvas and :func:`lost_in_positives` per level. Images are taken evenly spaced over
    the dataset, at most ``max_images`` of them (masks are decoded).

    Returns:
        images, instances (measured), per_level (L,) instances positive on the level,
        lost_per_level (L,), lost (instances positive on a level but lost on every level they
        are positive on: no cell of their own anywhere) and on_no_level.
    """
    import detectron2.data.transforms as T
    import torch
    from detectron2.data import detection_utils as utils

    from ..modeling.targets import assign_grid_targets, center_of_mass

    step = max(1, math.ceil(len(dicts) / max(max_images, 1)))
    chosen = dicts[::step][:max_images]
    levels = len(num_grids)
    per_level, lost_level = np.zeros(levels, np.int64), np.zeros(levels, np.int64)
    lost_total = instances = nowhere = 0
    for d in chosen:
        anns = [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
        anns = [a for a in anns if a.get("segmentation")]
        if not anns:
            continue
        h, w = int(d["height"]), int(d["width"])
        newh, neww = (
            int(v[0]) for v in resized_shape(np.array([h]), np.array([w]), short, max_size)
        )
        tfm = T.TransformList([T.ResizeTransform(h, w, newh, neww)])
        anns = [utils.transform_instance_annotations(dict(a), tfm, (newh, neww)) for a in anns]
        inst = utils.annotations_to_instances(anns, (newh, neww), mask_format="bitmask")
        valid = inst.gt_masks.tensor.flatten(1).any(1)  # empty masks are never positive
        if not valid.any():
            continue
        masks, labels = inst.gt_masks[valid], inst.gt_classes[valid]
        centers = center_of_mass(masks.tensor)
        boxes = masks.get_bounding_boxes().tensor
        canvas = tuple(-(-v // size_divisibility) * size_divisibility for v in (newh, neww))
        m = len(labels)
        _, positives = assign_grid_targets(
            boxes, centers, labels, torch.zeros(m, dtype=torch.int64), 1, canvas,
            list(num_grids), [list(r) for r in scale_ranges], sigma, int(labels.max()) + 1,
        )  # fmt: skip
        seen, owned = np.zeros(m, bool), np.zeros(m, bool)
        for level, pos in enumerate(positives):
            pos = pos.numpy()
            lost = lost_in_positives(pos, m)
            on = np.zeros(m, bool)
            on[pos[:, 2]] = True
            per_level[level] += on.sum()
            lost_level[level] += lost.sum()
            seen |= on
            owned |= on & ~lost
        instances += m
        lost_total += int((seen & ~owned).sum())
        nowhere += int((~seen).sum())
    return {
        "images": len(chosen),
        "instances": instances,
        "per_level": per_level.tolist(),
        "lost_per_level": lost_level.tolist(),
        "lost": lost_total,
        "on_no_level": nowhere,
    }


def _quantiles(x: np.ndarray) -> Dict[str, float]:
    if len(x) == 0:
        return {}
    q = np.percentile(x, [0, 5, 50, 95, 100])
    return {k: round(float(v), 1) for k, v in zip(("min", "p5", "median", "p95", "max"), q)}


def _summary(stats: List[Dict[str, np.ndarray]], num_objects: int) -> Dict:
    """The counts of one resize, averaged over its sizes (``stats``: one entry per size)."""

    def mean(key):
        values = np.mean([np.asarray(s[key], dtype=np.float64) for s in stats], axis=0)
        return np.round(values, 1).tolist()

    scales = np.concatenate([s["scale"] for s in stats])
    per_level = mean("per_level")
    return {
        "scale": _quantiles(scales),
        "per_level": per_level,
        "fraction_per_level": [round(c / max(num_objects, 1), 3) for c in per_level],
        "below_finest": mean("below_finest"),
        "above_coarsest": mean("above_coarsest"),
        "between_levels": mean("between_levels"),
        "on_two_levels": mean("on_two_levels"),
        "same_class_same_cell": mean("same_class_same_cell"),
        "same_cell_any_class": mean("same_cell_any_class"),
        "lost_targets": mean("lost_targets"),
        "too_small_for_area_filter": mean("too_small_for_area_filter"),
    }


def _warnings(report: Dict) -> List[str]:
    """Plain-language warnings where the config fits the data poorly, naming the keys."""
    out = []
    n = report["num_instances"]
    names = [lv["name"] for lv in report["levels"]]
    if n == 0:
        return ["the dataset has no instances SOLO could train on"]
    if report["num_classes_config"] != len(report["instances_per_class"]):
        out.append(
            f"MODEL.SOLO.NUM_CLASSES is {report['num_classes_config']} but the dataset has "
            f"{len(report['instances_per_class'])} classes: set MODEL.SOLO.NUM_CLASSES "
            f"{len(report['instances_per_class'])}"
        )
    resize_keys = {"train": "INPUT.MIN_SIZE_TRAIN", "test": "INPUT.MIN_SIZE_TEST"}
    for when in ("train", "test"):
        s = report[when]
        pct = lambda c: f"{100 * c / n:.0f}%"  # noqa: E731
        fractions = s["fraction_per_level"]
        # share of the positive (object, level) pairs: overlapping ranges count objects twice
        shares = np.asarray(s["per_level"]) / max(sum(s["per_level"]), 1e-9)
        top = int(np.argmax(shares))
        if len(names) > 1 and shares[top] > DOMINANT_LEVEL:
            out.append(
                f"after the {when} resize most objects go to level {names[top]} "
                f"({100 * shares[top]:.0f}% of the objects' level assignments): the other "
                "levels' heads learn from few objects; spread them with "
                f"MODEL.SOLO.FPN_SCALE_RANGES (or change {resize_keys[when]})"
            )
        if s["below_finest"] > MISSED_FRACTION * n:
            out.append(
                f"after the {when} resize {pct(s['below_finest'])} of the objects are smaller "
                f"than the finest level's range ({names[0]}: sqrt(w*h) >= "
                f"{report['levels'][0]['scale_range'][0]}) and are never positive: lower "
                f"MODEL.SOLO.FPN_SCALE_RANGES[0][0] or raise {resize_keys[when]}"
            )
        if s["above_coarsest"] > LARGE_FRACTION * n:
            out.append(
                f"after the {when} resize {pct(s['above_coarsest'])} of the objects are larger "
                f"than the coarsest level's range ({names[-1]}: sqrt(w*h) <= "
                f"{report['levels'][-1]['scale_range'][1]}) and are never positive: raise "
                "MODEL.SOLO.FPN_SCALE_RANGES[-1][1]"
            )
        if s["between_levels"] > LARGE_FRACTION * n:
            out.append(
                f"after the {when} resize {pct(s['between_levels'])} of the objects fall between "
                "two levels' ranges and are in none: make MODEL.SOLO.FPN_SCALE_RANGES touch or "
                "overlap"
            )
        for level, name in enumerate(names):
            if fractions[level] < EMPTY_LEVEL:
                out.append(
                    f"after the {when} resize level {name} receives almost no objects "
                    f"({s['per_level'][level]:g}): its {report['levels'][level]['num_grid']}^2 "
                    "grid learns background only; shift MODEL.SOLO.FPN_SCALE_RANGES (or drop "
                    "the level from MODEL.SOLO.INSTANCE_IN_FEATURES and the other per-level keys)"
                )
            lost = s["lost_targets"][level]
            if s["per_level"][level] and lost > SAME_CELL_FRACTION * s["per_level"][level]:
                out.append(
                    f"after the {when} resize {lost:g} of the {s['per_level'][level]:g} objects "
                    f"of level {name} have no grid cell of their own (every cell of their centre "
                    "region is also another object's, of any class; a cell predicts one mask): "
                    f"raise MODEL.SOLO.NUM_GRIDS[{level}] (now "
                    f"{report['levels'][level]['num_grid']}) or lower MODEL.SOLO.SIGMA"
                )
    small = sum(report["test"]["too_small_for_area_filter"])
    if small > MISSED_FRACTION * n:
        out.append(
            f"{100 * small / n:.0f}% of the objects are so small after the test resize that even "
            "a perfect mask is dropped by the inference area filter (mask pixels at the mask "
            "stride must outnumber the level's stride): raise INPUT.MIN_SIZE_TEST / "
            "MAX_SIZE_TEST"
        )
    rare = [c for c, k in report["instances_per_class"].items() if k < MIN_CLASS_INSTANCES]
    if rare:
        shown = ", ".join(rare[:10]) + (f" and {len(rare) - 10} more" if len(rare) > 10 else "")
        out.append(
            f"{len(rare)} classes have fewer than {MIN_CLASS_INSTANCES} instances ({shown}): "
            "expect a poor AP on them; collect more, or merge or drop them (MODEL.SOLO.NUM_CLASSES)"
        )
    return out


def _args_from_config(cfg, dicts, class_names, dataset_name=""):
    from ..modeling import mask_target_strides

    sc = cfg.MODEL.SOLO
    return {
        "dicts": dicts,
        "class_names": class_names,
        "dataset_name": dataset_name,
        "level_names": [f.upper() for f in sc.INSTANCE_IN_FEATURES],
        "scale_ranges": [list(r) for r in sc.FPN_SCALE_RANGES],
        "num_grids": list(sc.NUM_GRIDS),
        "level_strides": list(sc.FPN_INSTANCE_STRIDES),
        "mask_stride": min(mask_target_strides(cfg)),
        "train_sizes": train_short_sizes(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        ),
        "max_size_train": cfg.INPUT.MAX_SIZE_TRAIN,
        "test_size": cfg.INPUT.MIN_SIZE_TEST,
        "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        "num_classes": sc.NUM_CLASSES,
        "crop": bool(cfg.INPUT.CROP.ENABLED),
        "sigma": float(sc.SIGMA),
    }


@configurable(from_config=_args_from_config)
def analyze_dataset(
    dicts: List[dict],
    class_names: Sequence[str],
    *,
    dataset_name: str = "",
    level_names: Sequence[str],
    scale_ranges: Sequence[Sequence[float]],
    num_grids: Sequence[int],
    level_strides: Sequence[int],
    mask_stride: int,
    train_sizes: Sequence[int],
    max_size_train: int,
    test_size: int,
    max_size_test: int,
    num_classes: Optional[int] = None,
    crop: bool = False,
    sigma: float = DEFAULT_SIGMA,
) -> Dict:
    """The statistics of a dataset against a config's levels (module docstring), as a plain dict.

    Call it as ``analyze_dataset(cfg, dicts, class_names)`` (keys of ``cfg`` as in
    ``_args_from_config``) or with the keyword arguments.

    Args:
        dicts: detectron2 dataset dicts (:func:`collect_objects`).
        class_names: the dataset's thing classes, by contiguous id.
        level_names, scale_ranges, num_grids, level_strides: per level (L entries).
        mask_stride: the model's soft-mask stride.
        train_sizes, max_size_train: the train resize's short sides and longest side.
        test_size, max_size_test: the test resize.
        num_classes: MODEL.SOLO.NUM_CLASSES, checked against ``class_names``.
        crop: INPUT.CROP.ENABLED (not modelled: a warning says so).
        sigma: MODEL.SOLO.SIGMA (the positive centre regions, :func:`lost_to_shared_cells`).
    Returns:
        a dict: dataset, num_images, num_images_without_instances, image_sizes,
        instances_per_image, num_instances, left_out, instances_per_class, num_classes_config,
        levels, train, test (:func:`level_statistics`'s counts, averaged over the sizes),
        warnings; all JSON-serialisable but "_scales" ({"train", "test"}: numpy arrays of the
        object scales, every train size's concatenated, for :func:`plot_scale_histogram`).
    """
    n_levels = len(level_names)
    if not (len(scale_ranges) == len(num_grids) == len(level_strides) == n_levels):
        raise ValueError(
            "MODEL.SOLO.INSTANCE_IN_FEATURES, FPN_SCALE_RANGES, NUM_GRIDS and "
            f"FPN_INSTANCE_STRIDES must have the same length, got {n_levels}, "
            f"{len(scale_ranges)}, {len(num_grids)} and {len(level_strides)}"
        )
    objects = collect_objects(dicts)
    hw, category = objects["image_hw"], objects["category"]
    names = list(class_names) or [str(c) for c in range(int(category.max(initial=-1)) + 1)]
    unknown = (category < 0) | (category >= len(names))
    if unknown.any():
        raise ValueError(
            f"{int(unknown.sum())} annotations have a category id outside the dataset's "
            f"{len(names)} classes (first: {int(category[unknown][0])})"
        )
    per_image = np.bincount(objects["image"], minlength=len(hw))
    per_class = np.bincount(category, minlength=len(names))
    sizes, size_counts = np.unique(hw, axis=0, return_counts=True)
    common = np.argsort(-size_counts, kind="stable")[:5]
    levels = [
        {
            "name": name,
            "scale_range": [float(v) for v in r],
            "num_grid": int(s),
            "stride": int(st),
        }
        for name, r, s, st in zip(level_names, scale_ranges, num_grids, level_strides)
    ]
    args = (scale_ranges, num_grids, level_strides, mask_stride)
    kw = {"sigma": sigma}
    train = [level_statistics(objects, s, max_size_train, *args, **kw) for s in train_sizes]
    test = [level_statistics(objects, test_size, max_size_test, *args, **kw)]
    num = len(category)
    report = {
        "dataset": dataset_name,
        "num_images": len(hw),
        "num_images_without_instances": int((per_image == 0).sum()),
        "image_sizes": {
            "height": _quantiles(hw[:, 0]),
            "width": _quantiles(hw[:, 1]),
            "distinct": len(sizes),
            "most_common": [
                [int(sizes[i, 0]), int(sizes[i, 1]), int(size_counts[i])] for i in common
            ],
        },
        "instances_per_image": {
            **_quantiles(per_image),
            "mean": round(float(per_image.mean()), 2) if len(per_image) else 0.0,
        },
        "num_instances": num,
        "left_out": {
            "crowd": objects["num_crowd"],
            "without_segmentation": objects["num_without_segmentation"],
            "empty_box": objects["num_empty_box"],
        },
        "instances_per_class": {n: int(c) for n, c in zip(names, per_class)},
        "num_classes_config": int(num_classes) if num_classes is not None else len(names),
        "levels": levels,
        "train": {
            "short_sizes": [int(s) for s in train_sizes],
            "max_size": int(max_size_train),
            **_summary(train, num),
        },
        "test": {
            "short_sizes": [int(test_size)],
            "max_size": int(max_size_test),
            **_summary(test, num),
        },
    }
    report["warnings"] = _warnings(report)
    if crop:
        report["warnings"].append(
            "INPUT.CROP is enabled: training crops change object sizes and are not modelled here"
        )
    # the scales themselves, for the histogram (not written to report.json)
    report["_scales"] = {
        "train": np.concatenate([s["scale"] for s in train]),
        "test": test[0]["scale"],
    }
    return report


def _q(stats: Dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in stats.items()) or "none"


def _format_dataset(report: Dict) -> List[str]:
    """The dataset's own statistics: image sizes, instances per image and per class."""
    n = report["num_instances"]
    lines = [f"dataset {report['dataset']!r}: {report['num_images']} images, {n} instances"]
    sizes = report["image_sizes"]
    lines.append(
        f"image sizes: height ({_q(sizes['height'])}), width ({_q(sizes['width'])}), "
        f"{sizes['distinct']} "
        "distinct; most common (h, w, images): "
        + ", ".join(f"{h}x{w}: {c}" for h, w, c in sizes["most_common"])
    )
    lines.append(
        f"instances per image: {_q(report['instances_per_image'])} "
        f"({report['num_images_without_instances']} images without any)"
    )
    left = report["left_out"]
    if any(left.values()):
        lines.append(
            f"left out (not trained on): {left['crowd']} crowd, {left['without_segmentation']} "
            f"without segmentation, {left['empty_box']} with an empty box"
        )
    width = max([len(c) for c in report["instances_per_class"]] + [5])
    lines.append("instances per class:")
    lines += [f"  {c:<{width}} {k}" for c, k in report["instances_per_class"].items()]
    return lines


def format_report(report: Dict, levels_only: bool = False) -> str:
    """The report as text for the terminal; ``levels_only``: the per-level tables and warnings
    without the dataset's own statistics (image sizes, instances)."""
    lines = [] if levels_only else _format_dataset(report)
    for when in ("train", "test"):
        s = report[when]
        lines.append(
            f"after the {when} resize (short side {s['short_sizes']}, max {s['max_size']}"
            + (", counts averaged over the sizes" if len(s["short_sizes"]) > 1 else "")
            + f"): object scale sqrt(w*h) {_q(s['scale'])}"
        )
        lines.append(
            "  level  range          grid   objects (of all)  same-class same cell  "
            "same cell  lost (no own cell)  too small (area filter)"
        )
        for i, lv in enumerate(report["levels"]):
            lo, hi = lv["scale_range"]
            lines.append(
                f"  {lv['name']:<6} [{lo:g}, {hi:g}]".ljust(24)
                + f"{lv['num_grid']:>4}  {s['per_level'][i]:>8g}"
                + f"  ({100 * s['fraction_per_level'][i]:4.1f}%)"
                + f"  {s['same_class_same_cell'][i]:>20g}  {s['same_cell_any_class'][i]:>9g}"
                + f"  {s['lost_targets'][i]:>18g}  {s['too_small_for_area_filter'][i]:>10g}"
            )
        lines.append(
            f"  below the finest range: {s['below_finest']:g}, above the coarsest: "
            f"{s['above_coarsest']:g}, between ranges: {s['between_levels']:g}, on two levels: "
            f"{s['on_two_levels']:g}"
        )
    if report["warnings"]:
        lines.append("warnings:")
        lines += [f"  - {w}" for w in report["warnings"]]
    else:
        lines.append("no warnings: the config's levels fit the data")
    return "\n".join(lines)


def plot_scale_histogram(report: Dict, out_png: str) -> None:
    """Histogram of object scales after the train and test resizes, level ranges marked above."""
    from .training_plots import new_figure, save_figure

    scales = report["_scales"]
    levels = report["levels"]
    fig = new_figure(7.0, 4.2)
    grid = fig.add_gridspec(2, 1, height_ratios=[1, 4], hspace=0.05)
    ax_levels = fig.add_subplot(grid[0])
    ax = fig.add_subplot(grid[1], sharex=ax_levels)
    every = np.concatenate([scales["train"], scales["test"], [1.0]])
    hi_edge = max(float(every.max()), max(lv["scale_range"][1] for lv in levels[:-1]) * 2)
    lo_edge = max(min(float(every.min()), levels[0]["scale_range"][0]), 1.0)
    bins = np.geomspace(lo_edge * 0.9, hi_edge * 1.1, 50)
    train_weight = np.full(len(scales["train"]), 1.0 / max(len(report["train"]["short_sizes"]), 1))
    ax.hist(scales["train"], bins=bins, weights=train_weight, histtype="stepfilled", alpha=0.45,
            label="train resize (per epoch)")  # fmt: skip
    ax.hist(scales["test"], bins=bins, histtype="step", linewidth=1.8, label="test resize")
    ax.set_xscale("log")
    ax.set_xlabel("object scale sqrt(box w * h), input pixels")
    ax.set_ylabel("objects")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    colors = [f"C{i + 2}" for i in range(len(levels))]
    for i, (lv, color) in enumerate(zip(levels, colors)):
        lo, hi = lv["scale_range"]
        lo, hi = max(lo, bins[0]), min(hi, bins[-1])
        ax_levels.barh(i, hi - lo, left=lo, color=color, alpha=0.8, height=0.7)
        ax_levels.text(math.sqrt(lo * hi), i, f"{lv['name']} S={lv['num_grid']}", ha="center",
                       va="center", fontsize=7)  # fmt: skip
        for edge in (lo, hi):
            ax.axvline(edge, color=color, linestyle="--", linewidth=0.8)
    ax_levels.set_ylim(len(levels) - 0.5, -0.5)
    ax_levels.set_yticks([])
    ax_levels.tick_params(labelbottom=False)
    ax_levels.set_title(
        f"Object scales of {report['dataset'] or 'the dataset'} and the FPN levels' ranges",
        fontsize=10,
    )
    fig.subplots_adjust(left=0.1, right=0.97, top=0.93, bottom=0.12)
    save_figure(fig, out_png)
