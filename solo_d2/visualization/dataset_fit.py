"""A config fitted to a dataset's own statistics (``tools/analyze_dataset.py --fit OUT.yaml``).

The fitted config inherits the given one (``_BASE_``) and sets only what the data decides, each
value with a comment naming the statistic it came from. It never changes the architecture (the
levels, their strides, the heads' widths): the values below are target and inference settings,
so a fitted config still loads the base config's weights.

**Resizes.** The test short side is the images' median short side times a factor ``r``: the
factor that brings the 5th-percentile object scale (``sqrt(w * h)`` of the box) up to
:func:`min_kept_scale` (a mask filling half its box then still passes the inference area filter
of the finest level: mask pixels at the mask stride must outnumber the level's stride), clipped
to ``[min(1, base test short / median short), max(1, base MAX_SIZE_TEST / median long side)]``:
the fit does not shrink images below the base config's test size, nor spend more pixels than
the larger of the base's test size and the images' own. Training draws the short side from
``TRAIN_SIZE_FACTORS`` (0.8, 0.9, 1.0) of the test short side, as the SOLO papers' multi-scale
training (short side 640-800, test 800; Wang et al., "SOLO", ECCV 2020 and "SOLOv2", NeurIPS
2020), so an object is on the same level at train and test time. The longest side allowed is
the test short side times the largest aspect ratio (long / short side) of the images.

**Scale ranges.** The papers' ranges double from level to level and overlap by a factor 2
(COCO at 800 px: (1, 96), (48, 192), ..., (384, 2048)). The fit keeps that geometry and shifts
the base config's ranges by ``k`` whole octaves, ``k = round(log2(median object scale at the
test resize / upper end of the finest range))`` (0 for COCO with the published ranges, and for
the shapes dataset with the quickstart's). The finest range keeps its lower end and the
coarsest its upper end (or doubles it).

**Grids.** Each level keeps the base's ratio of object scale to grid cell: ``S' = S * 2**-k *
test short' / test short``, capped at the level's feature resolution (``test short / stride``)
and at least 2; then, while more than ``SAME_CELL_FRACTION`` of the level's objects are lost to
shared cells (every cell of their positive centre region is also another object's, of any
class: a cell predicts one category and one mask;
:func:`~solo_d2.visualization.dataset_report.lost_to_shared_cells`, equal to the model's own
assignment on the same centres), the grid grows by ``GRID_STEP`` up to the cap. (Counting only
objects of the same class, as this rule first did, let a fit halve the grids of an unseen
four-class dataset and lose 12x more objects to shared cells than the base config.)

**Sigma.** The centre region (``SIGMA`` x the box) of crowded objects overlaps that of a
neighbour on the same level, so both claim the same cells. If with the base's ``SIGMA`` more
than ``SAME_CELL_FRACTION`` of the objects have such an overlap, the fit takes the largest of
``SIGMA_CHOICES`` below it that brings the share under that fraction (or the smallest).

**Classes and detections.** ``NUM_CLASSES`` is the dataset's class count (panoptic data:
``PANOPTIC.NUM_STUFF_CLASSES`` its stuff categories); ``TEST.DETECTIONS_PER_IMAGE`` grows to 1.5
x the largest instance count of an image when the base's is below that.

**Tiles** (small objects in large images; :func:`fit_tiles`). When, at the whole-image resize
fitted above, more than ``TILE_UNDER_FILTER`` of the objects are still under the area filter
(the pixel budget stopped the upscale: ``megapixel``), or that resize costs more than
``TILE_COST_RATIO`` x the base's test pixels per image (keeping the objects above the filter
needs far larger images per iteration), the fit trains and infers on tiles instead
(``INPUT.TILE.*``): ``SCALE`` brings the 5th-percentile object scale to the area filter (at most
``TILE_MAX_SCALE``), ``SIZE`` makes the tile's model input the base's test short side (at
least twice the 95th-percentile object side), ``OVERLAP`` is that object side over the tile
(0.1-0.5: most objects are whole in some tile). The rest is the base's: a tile looks to the
model like the images the base was made for (its resizes, scale ranges and grids; whole images
still go through its resizes). Both options are reported with their cost per iteration,
estimated from pixels per image.

**Levels** (``fit_model=True``, ``--fit-model``: the architecture changes). The finest and
coarsest levels that receive under 1% of the objects at every train and test size are dropped
(``INSTANCE_IN_FEATURES``, ``FPN_INSTANCE_STRIDES`` and the per-level lists); the kept ranges
still reach the outer ends. The heads' weights are shared across levels, so the base's weights
still load.
"""

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..atomic_io import atomic_write_text
from .dataset_report import (
    EMPTY_LEVEL,
    SIZE_DIVISIBILITY,
    collect_objects,
    level_statistics,
    resized_shape,
)

__all__ = [
    "TRAIN_SIZE_FACTORS",
    "ConfigFit",
    "min_kept_scale",
    "fit_resizes",
    "fit_scale_ranges",
    "grid_caps",
    "scale_grids",
    "config_value",
    "fit_grids",
    "fit_sigma",
    "outer_empty_levels",
    "fit_tiles",
    "fit_config",
    "format_fit",
    "write_fit",
]

TRAIN_SIZE_FACTORS = (0.8, 0.9, 1.0)  # train short sides, fractions of the test short side
SMALL_QUANTILE = 5  # percentile of the object scales kept above the area filter
MASK_FILL = 0.5  # a mask covers at least this share of its box (the area filter's margin)
SAME_CELL_FRACTION = 0.05  # share of a level's objects allowed to lose their cell / region
GRID_STEP = 2
SIGMA_CHOICES = (0.4, 0.3, 0.2, 0.1)
DETECTIONS_MARGIN = 1.5
TILE_UNDER_FILTER = 0.2  # share of objects under the area filter at the whole-image fit
TILE_COST_RATIO = 8.0  # whole-image fit's test pixels per image over the base's
TILE_MAX_SCALE = 4.0
TILE_WHOLE_PROB = 0.25  # INPUT.TILE.WHOLE_IMAGE_PROB's default: whole images in training


@dataclass
class ConfigFit:
    """The fitted values: ``changes`` maps a config key to (value, comment)."""

    base_config: str
    dataset: str
    changes: Dict[str, Tuple[object, str]] = field(default_factory=dict)
    # what the fit chose between whole images and tiles, and what each costs (report lines)
    decision: List[str] = field(default_factory=list)

    def set(self, key: str, value, comment: str) -> None:
        self.changes[key] = (value, comment)


def min_kept_scale(mask_stride: int, finest_stride: int) -> float:
    """The smallest object scale (px) whose mask, covering ``MASK_FILL`` of its box, passes the
    inference area filter of the finest level (mask area at the mask stride > the stride)."""
    return mask_stride * math.sqrt(finest_stride / MASK_FILL)


def _round_to(x: float, step: int) -> int:
    return max(step, int(step * round(x / step)))


def fit_resizes(
    image_hw: np.ndarray,
    object_scales: np.ndarray,
    base_test_short: int,
    base_max_size_test: int,
    kept_scale: float,
) -> Dict:
    """The train and test resizes (module docstring) from native image sizes and object scales.

    Args:
        image_hw: (I, 2) image heights and widths.
        object_scales: (N,) sqrt(w * h) of the objects' boxes in the images' own pixels.
        base_test_short, base_max_size_test: the base config's test resize (its pixel budget).
        kept_scale: :func:`min_kept_scale`.
    Returns:
        test_short, max_size, train_shorts, factor and the statistics used (median_short,
        median_long, max_aspect, small_scale, needed_factor).
    """
    short = np.minimum(image_hw[:, 0], image_hw[:, 1]).astype(np.float64)
    long = np.maximum(image_hw[:, 0], image_hw[:, 1]).astype(np.float64)
    median_short, median_long = float(np.median(short)), float(np.median(long))
    max_aspect = float((long / short).max())
    small = float(np.percentile(object_scales, SMALL_QUANTILE)) if len(object_scales) else 0.0
    needed = kept_scale / small if small > 0 else 1.0
    lo = min(1.0, base_test_short / median_short)
    hi = max(1.0, base_max_size_test / median_long)
    factor = float(np.clip(needed, lo, hi))
    test_short = _round_to(median_short * factor, 8)
    max_size = SIZE_DIVISIBILITY * math.ceil(test_short * max_aspect / SIZE_DIVISIBILITY)
    train_shorts = sorted({_round_to(test_short * f, 8) for f in TRAIN_SIZE_FACTORS})
    return {
        "test_short": test_short,
        "max_size": max_size,
        "train_shorts": train_shorts,
        "factor": round(factor, 3),
        "needed_factor": round(needed, 3),
        "median_short": median_short,
        "median_long": median_long,
        "max_aspect": round(max_aspect, 3),
        "small_scale": round(small, 1),
        "factor_bounds": (round(lo, 3), round(hi, 3)),
    }


def _mean_pixels(image_hw: np.ndarray, short: int, max_size: int) -> float:
    h, w = resized_shape(image_hw[:, 0], image_hw[:, 1], short, max_size)
    return float(np.mean(h * w))


def _ceil_to(x: float, step: float) -> float:
    return round(step * math.ceil(x / step - 1e-9), 6)


def fit_tiles(
    objects: Dict[str, np.ndarray],
    rs: Dict,
    kept_scale: float,
    base_test: Tuple[int, int],
    base_train: Tuple[int, int],
) -> Dict:
    """Whole images or tiles (module docstring, "Tiles"), with the cost of each.

    Args:
        objects: :func:`~.dataset_report.collect_objects`.
        rs: :func:`fit_resizes` (the whole-image option).
        kept_scale: :func:`min_kept_scale`.
        base_test: the base's (MIN_SIZE_TEST, MAX_SIZE_TEST).
        base_train: the base's (largest MIN_SIZE_TRAIN, MAX_SIZE_TRAIN).
    Returns:
        chosen (bool: tiles), size, scale, overlap, under (share of the objects under the filter
        at the whole-image fit), and pixels per image: whole_test, whole_train, base_test,
        base_train, tile_train (mean over training samples), tile_test (tiles and the whole
        image).
    """
    hw, box = objects["image_hw"], objects["box"]
    scales = _scales_at(objects, rs["test_short"], rs["max_size"])
    under = float(np.mean(scales < kept_scale)) if len(scales) else 0.0
    whole_test = _mean_pixels(hw, rs["test_short"], rs["max_size"])
    whole_train = _mean_pixels(hw, max(rs["train_shorts"]), rs["max_size"])
    base_test_px = _mean_pixels(hw, *base_test)
    base_train_px = _mean_pixels(hw, *base_train)
    native = np.sqrt(box[:, 2] * box[:, 3])
    small = float(np.percentile(native, SMALL_QUANTILE))
    side = float(np.percentile(np.maximum(box[:, 2], box[:, 3]), 100 - SMALL_QUANTILE))
    scale = float(np.clip(_ceil_to(kept_scale / max(small, 1e-6), 0.25), 1.0, TILE_MAX_SCALE))
    size = max(_round_to(base_test[0] / scale, 16), 32, 16 * math.ceil(2 * side / 16))
    size = int(min(size, max(32, int(hw.max()))))
    overlap = float(np.clip(_ceil_to(side / size, 0.05), 0.1, 0.5))
    stride = max(1, size - int(round(overlap * size)))
    tiles_per_image = np.mean(
        [
            (1 if h <= size else -(-(h - size) // stride) + 1)
            * (1 if w <= size else -(-(w - size) // stride) + 1)
            for h, w in hw.tolist()
        ]
    )
    tile_px = (size * scale) ** 2
    return {
        "chosen": under > TILE_UNDER_FILTER or whole_test > TILE_COST_RATIO * base_test_px,
        "size": size,
        "scale": scale,
        "overlap": overlap,
        "under": under,
        "small_scale": small,
        "object_side": side,
        "whole_test": whole_test,
        "whole_train": whole_train,
        "base_test": base_test_px,
        "base_train": base_train_px,
        "tile_train": (1 - TILE_WHOLE_PROB) * tile_px + TILE_WHOLE_PROB * base_train_px,
        "tile_test": float(tiles_per_image) * tile_px + base_test_px,
    }


def _tile_decision(t: Dict, rs: Dict) -> List[str]:
    """The report lines of :func:`fit_tiles`: the option chosen and what each costs."""
    mp = 1e6
    whole = (
        f"whole images at short side {rs['test_short']} (train {min(rs['train_shorts'])}-"
        f"{max(rs['train_shorts'])}): {100 * t['under']:.0f}% of the objects still under the "
        f"area filter; {t['whole_train'] / mp:.2f} Mpx per training image "
        f"({t['whole_train'] / t['base_train']:.1f}x the base's), {t['whole_test'] / mp:.2f} "
        f"Mpx per test image ({t['whole_test'] / t['base_test']:.1f}x)"
    )
    tiles = (
        f"tiles of {t['size']} px x {t['scale']:g} (model input {round(t['size'] * t['scale'])} "
        f"px), overlap {t['overlap']:g}: {t['tile_train'] / mp:.2f} Mpx per training sample "
        f"({t['tile_train'] / t['base_train']:.1f}x the base's, {100 * TILE_WHOLE_PROB:g}% whole "
        f"images at the base's size), {t['tile_test'] / mp:.2f} Mpx per test image "
        f"({t['tile_test'] / t['base_test']:.1f}x; all tiles and the whole image)"
    )
    why = (
        f"more than {100 * TILE_UNDER_FILTER:g}% under the filter"
        if t["under"] > TILE_UNDER_FILTER
        else f"whole images cost over {TILE_COST_RATIO:g}x the base's test pixels"
    )
    if t["chosen"]:
        return [f"chose tiles ({why}): {tiles}", f"not chosen: {whole}"]
    return [
        f"chose whole images ({100 * t['under']:.0f}% under the filter, at most "
        f"{100 * TILE_UNDER_FILTER:g}%; {t['whole_test'] / t['base_test']:.1f}x the base's "
        f"test pixels, at most {TILE_COST_RATIO:g}x): {whole}",
        f"not chosen: {tiles}",
    ]


def _scales_at(objects: Dict[str, np.ndarray], short: int, max_size: int) -> np.ndarray:
    hw = objects["image_hw"]
    newh, neww = resized_shape(hw[:, 0], hw[:, 1], short, max_size)
    img, box = objects["image"], objects["box"]
    sy, sx = newh / np.maximum(hw[:, 0], 1), neww / np.maximum(hw[:, 1], 1)
    return np.sqrt(box[:, 2] * sx[img] * box[:, 3] * sy[img])


def fit_scale_ranges(
    scales: np.ndarray, base_ranges: Sequence[Sequence[float]]
) -> Tuple[List[List[int]], int, float]:
    """The base ranges shifted by whole octaves to the data (module docstring).

    Args:
        scales: (N,) object scales at the fitted test resize.
        base_ranges: (L, 2) the base config's FPN_SCALE_RANGES.
    Returns:
        the ranges (ints, at least 1), the shift ``k`` in octaves and the median scale.
    """
    median = float(np.median(scales)) if len(scales) else float(base_ranges[0][1])
    k = int(round(math.log2(max(median, 1e-6) / float(base_ranges[0][1]))))
    ranges = [[max(1, int(round(lo * 2.0**k))), max(1, int(round(hi * 2.0**k)))]
              for lo, hi in base_ranges]  # fmt: skip
    ranges[0][0] = int(base_ranges[0][0])
    ranges[-1][1] = int(max(base_ranges[-1][1], base_ranges[-1][1] * 2.0**k))
    return ranges, k, median


def grid_caps(test_short: int, level_strides: Sequence[int]) -> List[int]:
    """The largest grid of each level: its feature resolution at the test short side (>= 2)."""
    return [max(2, math.ceil(test_short / s)) for s in level_strides]


def scale_grids(grids: Sequence[int], factor: float, caps: Sequence[int]) -> List[int]:
    """``grids`` x ``factor``, rounded, at least 2 and at most ``caps`` (:func:`grid_caps`)."""
    return [int(min(cap, max(2, round(g * factor)))) for g, cap in zip(grids, caps)]


def config_value(cfg, key: str):
    """The value of the dotted ``key`` ("MODEL.SOLO.NUM_GRIDS") in ``cfg``."""
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def fit_grids(
    objects: Dict[str, np.ndarray],
    resize: Tuple[int, int],
    ranges: Sequence[Sequence[float]],
    base_grids: Sequence[int],
    octave_shift: int,
    base_test_short: int,
    level_strides: Sequence[int],
    mask_stride: int,
    sigma: float,
) -> Tuple[List[int], List[int], List[float]]:
    """The grids (module docstring) at the test resize ``resize`` = (short, max_size).

    Returns:
        the grids, the scale-only grids before the collision rule, and each level's share of
        objects lost to shared cells (any class, centre regions at ``sigma``) at the returned
        grids.
    """
    short = resize[0]
    caps = grid_caps(short, level_strides)
    start = scale_grids(base_grids, 2.0**-octave_shift * short / base_test_short, caps)
    grids = list(start)
    args = (objects, resize[0], resize[1], ranges)
    while True:
        stats = level_statistics(*args, grids, level_strides, mask_stride, sigma=sigma)
        shared = stats["lost_targets"] / np.maximum(stats["per_level"], 1)
        grow = [i for i, f in enumerate(shared) if f > SAME_CELL_FRACTION and grids[i] < caps[i]]
        if not grow:
            return grids, start, [round(float(f), 3) for f in shared]
        for i in grow:
            grids[i] = min(caps[i], grids[i] + GRID_STEP)


def _region_overlap_share(
    objects: Dict[str, np.ndarray], resize: Tuple[int, int], level: np.ndarray, sigma: float
) -> float:
    """Share of the objects whose ``sigma`` centre region overlaps that of another object of the
    same image and level (``level``: (N,) the finest level of each object, -1 for none)."""
    hw = objects["image_hw"]
    newh, neww = resized_shape(hw[:, 0], hw[:, 1], *resize)
    img, box = objects["image"], objects["box"]
    sy, sx = newh / np.maximum(hw[:, 0], 1), neww / np.maximum(hw[:, 1], 1)
    w, h = box[:, 2] * sx[img], box[:, 3] * sy[img]
    cx, cy = box[:, 0] * sx[img] + w / 2, box[:, 1] * sy[img] + h / 2
    overlapping = 0
    group = img * (int(level.max(initial=0)) + 2) + level + 1
    for g in np.unique(group[level >= 0]):
        i = np.flatnonzero(group == g)
        dx = np.abs(cx[i, None] - cx[None, i]) < sigma * (w[i, None] + w[None, i]) / 2
        dy = np.abs(cy[i, None] - cy[None, i]) < sigma * (h[i, None] + h[None, i]) / 2
        both = dx & dy
        np.fill_diagonal(both, False)
        overlapping += int(both.any(1).sum())
    return overlapping / max(len(img), 1)


def fit_sigma(
    objects: Dict[str, np.ndarray],
    resize: Tuple[int, int],
    ranges: Sequence[Sequence[float]],
    base_sigma: float,
) -> Tuple[float, Dict[float, float]]:
    """SIGMA (module docstring); returns it and the overlap share of each sigma tried."""
    scales = _scales_at(objects, *resize)
    r = np.asarray(ranges, dtype=np.float64)
    on = (scales[None] >= r[:, :1]) & (scales[None] <= r[:, 1:])
    level = np.where(on.any(0), on.argmax(0), -1)
    choices = [base_sigma] + [s for s in SIGMA_CHOICES if s < base_sigma]
    tried = {}
    for sigma in choices:
        tried[sigma] = round(_region_overlap_share(objects, resize, level, sigma), 3)
        if tried[sigma] <= SAME_CELL_FRACTION:
            return sigma, tried
    return choices[-1], tried


def outer_empty_levels(
    objects: Dict[str, np.ndarray],
    resizes: Sequence[Tuple[int, int]],
    ranges: Sequence[Sequence[float]],
) -> List[int]:
    """The levels to keep: all but the finest and coarsest ones that receive under EMPTY_LEVEL of
    the objects at every one of ``resizes`` ((short, max_size) pairs); at least one level."""
    r = np.asarray(ranges, dtype=np.float64)
    share = np.zeros(len(r))
    for resize in resizes:
        scales = _scales_at(objects, *resize)
        on = (scales[None] >= r[:, :1]) & (scales[None] <= r[:, 1:])
        share = np.maximum(share, on.mean(1) if len(scales) else 0)
    used = np.flatnonzero(share >= EMPTY_LEVEL)
    if len(used) == 0:
        return list(range(len(r)))
    return list(range(int(used[0]), int(used[-1]) + 1))


def fit_config(
    cfg,
    dicts: List[dict],
    class_names: Sequence[str],
    *,
    base_config: str,
    dataset_name: str = "",
    stuff_classes: Optional[Sequence[str]] = None,
    fit_model: bool = False,
) -> ConfigFit:
    """Fit ``cfg`` (the loaded base config) to the dataset ``dicts`` (module docstring).

    Args:
        cfg: the base config, as :func:`solo_d2.config.load_config` gives it.
        dicts: the dataset's detectron2 dicts (COCO, LVIS or panoptic).
        class_names: its thing classes.
        base_config: the base config's file, written as ``_BASE_``.
        dataset_name: the registered name, written as ``DATASETS.TRAIN``.
        stuff_classes: panoptic data: ``"things"`` then the stuff classes (its metadata).
        fit_model: also change the architecture: drop the finest and coarsest levels that no
            resize gives objects (:func:`outer_empty_levels`).
    Raises:
        ValueError: the dataset has no instance to fit to.
    """
    from ..modeling import mask_target_strides

    sc = cfg.MODEL.SOLO
    objects = collect_objects(dicts)
    if len(objects["box"]) == 0:
        raise ValueError(f"dataset {dataset_name!r} has no instances to fit a config to")
    fit = ConfigFit(base_config=base_config, dataset=dataset_name)
    if dataset_name:
        fit.set("DATASETS.TRAIN", (dataset_name,), "the analysed dataset")
        fit.set("DATASETS.TEST", (), "name your validation set here or on the command line")
    n_classes = len(class_names)
    fit.set("MODEL.SOLO.NUM_CLASSES", n_classes, f"the dataset's {n_classes} thing classes")
    if stuff_classes:
        n_stuff = len(stuff_classes) - 1
        fit.set(
            "MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES",
            n_stuff,
            f"the dataset's {n_stuff} stuff classes",
        )

    mask_stride = min(mask_target_strides(cfg))
    strides = list(sc.FPN_INSTANCE_STRIDES)
    kept = min_kept_scale(mask_stride, strides[0])
    native = np.sqrt(objects["box"][:, 2] * objects["box"][:, 3])
    rs = fit_resizes(
        objects["image_hw"], native, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, kept
    )
    tiles = fit_tiles(
        objects,
        rs,
        kept,
        (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST),
        (max(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN),
    )
    fit.decision = _tile_decision(tiles, rs)
    if tiles["chosen"]:
        _set_tiles(fit, tiles, kept)
        _fit_detections(fit, objects, cfg)
        return fit
    lo, hi = rs["factor_bounds"]
    fit.set(
        "INPUT.MIN_SIZE_TEST",
        rs["test_short"],
        f"median image short side {rs['median_short']:g} px x {rs['factor']:g}: the p"
        f"{SMALL_QUANTILE} object scale {rs['small_scale']:g} px needs x{rs['needed_factor']:g} "
        f"to reach {kept:.1f} px (area filter), within [x{lo:g}, x{hi:g}] (base test size, "
        "native size)",
    )
    fit.set(
        "INPUT.MAX_SIZE_TEST",
        rs["max_size"],
        f"test short side x the largest image aspect ratio {rs['max_aspect']:g}",
    )
    fit.set(
        "INPUT.MIN_SIZE_TRAIN",
        tuple(rs["train_shorts"]),
        f"{', '.join(f'{f:g}' for f in TRAIN_SIZE_FACTORS)} x the test short side, as the "
        "SOLO papers' multi-scale training",
    )
    fit.set("INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice", "one of the train short sides per image")
    fit.set("INPUT.MAX_SIZE_TRAIN", rs["max_size"], "as INPUT.MAX_SIZE_TEST")

    resize = (rs["test_short"], rs["max_size"])
    scales = _scales_at(objects, *resize)
    base_ranges = [list(r) for r in sc.FPN_SCALE_RANGES]
    ranges, k, median = fit_scale_ranges(scales, base_ranges)
    fit.set(
        "MODEL.SOLO.FPN_SCALE_RANGES",
        ranges,
        f"base ranges x 2^{k}: median object scale {median:.1f} px at the test resize vs the "
        f"finest range's upper end {base_ranges[0][1]:g}",
    )
    sigma, tried = fit_sigma(objects, resize, ranges, float(sc.SIGMA))
    if sigma != sc.SIGMA:
        fit.set(
            "MODEL.SOLO.SIGMA",
            sigma,
            "share of objects whose centre region overlaps a neighbour's on their level: "
            + ", ".join(f"{100 * v:.0f}% at {s:g}" for s, v in tried.items()),
        )
    grids, start, shared = fit_grids(
        objects, resize, ranges, list(sc.NUM_GRIDS), k, cfg.INPUT.MIN_SIZE_TEST, strides,
        mask_stride, sigma,
    )  # fmt: skip
    fit.set(
        "MODEL.SOLO.NUM_GRIDS",
        grids,
        f"base grids x 2^{-k} x {rs['test_short']}/{cfg.INPUT.MIN_SIZE_TEST} = {start} (capped "
        f"at test size / stride), grown while > {100 * SAME_CELL_FRACTION:g}% have no cell of "
        f"their own (any class): now {[f'{100 * f:.0f}%' for f in shared]}",
    )
    if fit_model:
        sizes = [(short, rs["max_size"]) for short in rs["train_shorts"]] + [resize]
        keep = outer_empty_levels(objects, sizes, ranges)
        if keep != list(range(len(ranges))):
            kept = [list(ranges[i]) for i in keep]
            kept[0][0], kept[-1][1] = ranges[0][0], ranges[-1][1]
            why = (
                f"--fit-model: levels {keep} of {len(ranges)} kept; the others receive under "
                f"{100 * EMPTY_LEVEL:g}% of the objects at every train and test size"
            )
            features = list(sc.INSTANCE_IN_FEATURES)
            fit.set("MODEL.SOLO.INSTANCE_IN_FEATURES", [features[i] for i in keep], why)
            fit.set("MODEL.SOLO.FPN_INSTANCE_STRIDES", [strides[i] for i in keep], why)
            fit.set("MODEL.SOLO.FPN_SCALE_RANGES", kept, fit.changes[
                "MODEL.SOLO.FPN_SCALE_RANGES"][1] + "; outer ends kept")  # fmt: skip
            fit.set("MODEL.SOLO.NUM_GRIDS", [grids[i] for i in keep],
                    fit.changes["MODEL.SOLO.NUM_GRIDS"][1])  # fmt: skip
    _fit_detections(fit, objects, cfg)
    return fit


def _set_tiles(fit: ConfigFit, t: Dict, kept: float) -> None:
    why = (
        f"{100 * t['under']:.0f}% of the objects under the area filter at the whole-image fit"
        if t["under"] > TILE_UNDER_FILTER
        else f"the whole-image fit costs {t['whole_test'] / t['base_test']:.1f}x the base's pixels"
    )
    fit.set("INPUT.TILE.TRAIN", True, f"small objects in large images: {why}")
    fit.set("INPUT.TILE.TEST", True, "infer on tiles too, as trained")
    fit.set(
        "INPUT.TILE.SCALE",
        t["scale"],
        f"brings the p{SMALL_QUANTILE} object scale {t['small_scale']:.1f} px to {kept:.1f} px "
        f"(area filter), at most x{TILE_MAX_SCALE:g}",
    )
    fit.set(
        "INPUT.TILE.SIZE",
        t["size"],
        "x SCALE = the base's test short side (model input), at least 2 x the "
        f"p{100 - SMALL_QUANTILE} object side {t['object_side']:.0f} px",
    )
    fit.set(
        "INPUT.TILE.OVERLAP",
        t["overlap"],
        f"the p{100 - SMALL_QUANTILE} object side over the tile, in [0.1, 0.5]",
    )


def _fit_detections(fit: ConfigFit, objects: Dict[str, np.ndarray], cfg) -> None:
    per_image = np.bincount(objects["image"], minlength=len(objects["image_hw"]))
    most = int(per_image.max())
    wanted = 10 * math.ceil(DETECTIONS_MARGIN * most / 10)
    if wanted > cfg.TEST.DETECTIONS_PER_IMAGE:
        fit.set(
            "TEST.DETECTIONS_PER_IMAGE",
            wanted,
            f"{DETECTIONS_MARGIN:g} x the most instances in one image ({most})",
        )


def _yaml_value(value) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        inner = ", ".join(_yaml_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):  # "3.0", not "3": yacs refuses an int for a float key
        return f"{value:g}" if not value.is_integer() else f"{value:.1f}"
    return str(value)


def format_fit(fit: ConfigFit, out_path: str, notes: Sequence[str] = ()) -> str:
    """The YAML text of ``fit``; ``_BASE_`` is relative to ``out_path``'s folder; ``notes``:
    more comment lines for the header (the trial table of ``--trials``)."""
    base = os.path.relpath(
        os.path.abspath(fit.base_config), os.path.dirname(os.path.abspath(out_path))
    )
    lines = [
        f"# Fitted to the statistics of dataset {fit.dataset!r} by tools/analyze_dataset.py --fit",
        "# (solo_d2/visualization/dataset_fit.py); each value's comment names its statistic.",
        *(f"# {line}" for line in fit.decision),
        *(f"# {line}" for note in notes for line in note.splitlines()),
        f'_BASE_: "{base}"',
    ]
    tree: Dict = {}
    for key, value in fit.changes.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    def emit(node: Dict, depth: int) -> None:
        for name, child in node.items():
            indent = "  " * depth
            if isinstance(child, dict):
                lines.append(f"{indent}{name}:")
                emit(child, depth + 1)
            else:
                value, comment = child
                lines.extend([f"{indent}# {comment}", f"{indent}{name}: {_yaml_value(value)}"])

    emit(tree, 0)
    return "\n".join(lines) + "\n"


def write_fit(fit: ConfigFit, out_path: str, notes: Sequence[str] = ()) -> None:
    """Write ``fit`` as a YAML config to ``out_path`` (atomically), ``notes`` as comments."""
    atomic_write_text(out_path, format_fit(fit, out_path, notes))
