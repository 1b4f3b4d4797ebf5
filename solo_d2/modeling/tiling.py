"""Tiled inference: small objects in large images (``INPUT.TILE.TEST``).

The image is cut into overlapping ``SIZE`` x ``SIZE`` tiles of its full resolution (each resized
by ``SCALE`` before the model), run in batches, and also run whole at the usual test resize; the
detections of all these passes are merged *by mask* into one set of ``Instances`` at the image's
size, so that an object cut by a tile border comes out as one instance. This is slicing-aided
inference as SAHI does it (Akyon et al., "Slicing Aided Hyper Inference and Fine-tuning for Small
Object Detection", ICIP 2022, arXiv:2202.06934; github.com/obss/sahi: ``get_slice_bboxes``,
``GREEDYNMM`` with the IoS metric, union of masks, max score), with two differences: matches
are measured on masks, not boxes, and only inside the window both passes saw.

Memory stays bounded on very large images: a detection is kept as its mask cropped to its box
(plus its offset), never as an image-sized mask; only the final detections (at most
``TEST.DETECTIONS_PER_IMAGE``) are pasted into image-sized masks, as untiled inference returns.

The same function serves every caller: the meta-architecture (train_net evaluation, the demo,
``SOLOPredictor``, ``model_zoo``) and the ONNX Runtime predictor pass their own one-pass
inference as ``run``.

Shape shorthand:
    T: tiles    D: detections of all passes    P: candidate pairs    K: final detections
    H, W: image size    boxes are XYXY, integer pixel edges (x1, y1 exclusive)
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import detectron2.data.transforms as T
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances
from torch import Tensor

from .postprocessing import masks_to_boxes

__all__ = [
    "TileSettings",
    "check_tile_config",
    "tile_settings",
    "tile_grid",
    "resize_image",
    "test_resize_hw",
    "candidate_pairs",
    "group_matches",
    "tiled_inference",
]

# run(inputs) -> per input its Instances at the input's ("height", "width"): one untiled pass
RunFn = Callable[[List[Dict]], List[Instances]]


@dataclass(frozen=True)
class TileSettings:
    """Tiled-inference settings (the ``INPUT.TILE`` keys; see ``add_solo_config``).

    Attributes:
        size: tile side in pixels of the original image.
        scale: resize of a tile before the model.
        overlap: share of the tile side that neighbouring tiles overlap.
        batch_size: tiles per network call.
        merge_thresh: mask IoS (inside the window both passes saw) that makes two detections one.
        whole_image: also run the whole image at the test resize.
        test_short, test_max: the test resize (``MIN_SIZE_TEST``, ``MAX_SIZE_TEST``).
    """

    size: int = 512
    scale: float = 1.0
    overlap: float = 0.25
    batch_size: int = 4
    merge_thresh: float = 0.5
    whole_image: bool = True
    test_short: int = 800
    test_max: int = 1333

    def __post_init__(self):
        _check_tile_values(
            size=self.size,
            scale=self.scale,
            overlap=self.overlap,
            batch_size=self.batch_size,
            merge_thresh=self.merge_thresh,
        )


def _check_tile_values(**values) -> None:
    """Raise ValueError naming the ``INPUT.TILE`` key of a value out of its range."""
    rules = {
        "size": (
            lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 32,
            "an int >= 32",
        ),
        "scale": (lambda v: _number(v) and 0.1 <= v <= 16, "a number in [0.1, 16]"),
        "overlap": (lambda v: _number(v) and 0 <= v <= 0.5, "a number in [0, 0.5]"),
        "batch_size": (
            lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
            "an int >= 1",
        ),
        "merge_thresh": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "whole_image_prob": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
        "instance_prob": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
        "min_visible": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    }
    for name, value in values.items():
        ok, expected = rules[name]
        if not ok(value):
            raise ValueError(f"INPUT.TILE.{name.upper()} must be {expected}, got {value!r}")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_tile_config(cfg) -> None:
    """Check every ``INPUT.TILE`` key of ``cfg`` (clear ValueErrors naming the key); called when
    tiled training or inference is on."""
    t = cfg.INPUT.TILE
    for key in ("TRAIN", "TEST", "WHOLE_IMAGE_TEST"):
        if not isinstance(t[key], bool):
            raise ValueError(f"INPUT.TILE.{key} must be True or False, got {t[key]!r}")
    _check_tile_values(
        size=t.SIZE,
        scale=t.SCALE,
        overlap=t.OVERLAP,
        batch_size=t.BATCH_SIZE,
        merge_thresh=t.MERGE_THRESH,
        whole_image_prob=t.WHOLE_IMAGE_PROB,
        instance_prob=t.INSTANCE_PROB,
        min_visible=t.MIN_VISIBLE,
    )
    if t.TEST and cfg.MODEL.META_ARCHITECTURE == "PanopticSOLO":
        raise ValueError("INPUT.TILE.TEST is for instance models, not PanopticSOLO")


def tile_settings(cfg) -> Optional[TileSettings]:
    """The tiled-inference settings of ``cfg``, or None when ``INPUT.TILE.TEST`` is off."""
    if not cfg.INPUT.TILE.get("TEST", False):
        return None
    check_tile_config(cfg)
    t = cfg.INPUT.TILE
    return TileSettings(
        size=t.SIZE,
        scale=float(t.SCALE),
        overlap=float(t.OVERLAP),
        batch_size=t.BATCH_SIZE,
        merge_thresh=float(t.MERGE_THRESH),
        whole_image=t.WHOLE_IMAGE_TEST,
        test_short=cfg.INPUT.MIN_SIZE_TEST,
        test_max=cfg.INPUT.MAX_SIZE_TEST,
    )


def _starts(length: int, size: int, stride: int) -> Tensor:
    """(n,) tile starts along one side: every ``stride`` pixels, the last snapped so that its
    tile ends at the image's edge (as SAHI's ``get_slice_bboxes``); [0] when one tile covers it."""
    if length <= size:
        return torch.zeros(1, dtype=torch.int64)
    n = -(-(length - size) // stride) + 1
    starts = torch.arange(n, dtype=torch.int64) * stride
    starts[-1] = length - size
    return starts


def tile_grid(height: int, width: int, size: int, overlap: float) -> Tensor:
    """The tiles of an image, row-major.

    Neighbouring tiles overlap by ``round(overlap * size)`` pixels or more (the last row and
    column are moved inside the image, overlapping more); tiles cover the image exactly and never
    leave it; a side shorter than ``size`` is one tile of its length.

    Args:
        height, width: image size (>= 1).
        size: tile side (>= 1).
        overlap: in [0, 1).
    Returns:
        (T, 4) int64 XYXY tiles, x1/y1 exclusive.
    """
    if height < 1 or width < 1 or size < 1 or not 0 <= overlap < 1:
        raise ValueError(f"tile_grid: bad arguments {height=} {width=} {size=} {overlap=}")
    stride = max(1, size - int(round(overlap * size)))
    ys, xs = _starts(height, size, stride), _starts(width, size, stride)
    y0 = ys.repeat_interleave(len(xs))
    x0 = xs.repeat(len(ys))
    return torch.stack([x0, y0, (x0 + size).clamp(max=width), (y0 + size).clamp(max=height)], 1)


def resize_image(image: Tensor, out_hw: Tuple[int, int]) -> Tensor:
    """``image`` (C, H, W) resized to ``out_hw`` with detectron2's ``ResizeTransform``, as the data
    mapper and ``SOLOPredictor`` resize (PIL bilinear for uint8, torch bilinear otherwise); the
    same tensor when the size is unchanged."""
    h, w = image.shape[-2:]
    if (h, w) == tuple(out_hw):
        return image
    array = image.cpu().permute(1, 2, 0).numpy()
    resized = T.ResizeTransform(h, w, out_hw[0], out_hw[1]).apply_image(array)
    return torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))


def test_resize_hw(height: int, width: int, settings: TileSettings) -> Tuple[int, int]:
    """Size of the whole image at the test resize (``ResizeShortestEdge``'s arithmetic)."""
    return T.ResizeShortestEdge.get_output_shape(
        height, width, settings.test_short, settings.test_max
    )


@dataclass
class _Detections:
    """Detections of all passes, each mask cropped to its box (D detections)."""

    boxes: List[Tensor]  # (n, 4) int64 image coordinates, tight around the mask
    scores: List[Tensor]
    classes: List[Tensor]
    passes: List[Tensor]  # (n,) index into the pass rectangles
    crops: List[Tensor]  # D bool masks (y1 - y0, x1 - x0)

    def add(self, inst: Instances, pass_id: int, offset: Tuple[int, int], crops: List[Tensor]):
        self.boxes.append(inst.pred_boxes.tensor.to(torch.int64) + torch.tensor(offset * 2))
        self.scores.append(inst.scores.float().cpu())
        self.classes.append(inst.pred_classes.cpu())
        self.passes.append(torch.full((len(inst),), pass_id, dtype=torch.int64))
        self.crops.extend(crops)


def _crop_masks(masks: Tensor, boxes: Tensor) -> List[Tensor]:
    """Each (H, W) mask cut to its (integer XYXY) box: (n, H, W), (n, 4) -> n tensors."""
    return [m[b[1] : b[3], b[0] : b[2]].clone() for m, b in zip(masks, boxes.tolist())]


def _nonempty(inst: Instances) -> Instances:
    inst = inst.to("cpu")
    boxes = inst.pred_boxes.tensor
    return inst[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]


def _whole_pass(
    image: Tensor, run: RunFn, settings: TileSettings, dets: _Detections, pass_id: int
) -> None:
    """Run the whole image at the test resize; its masks come back at that size and only each
    detection's box is resized to full resolution."""
    h, w = image.shape[-2:]
    hw = test_resize_hw(h, w, settings)
    inst = _nonempty(run([{"image": resize_image(image, hw), "height": hw[0], "width": hw[1]}])[0])
    if len(inst) == 0:
        return
    low = inst.pred_boxes.tensor.to(torch.int64)  # boxes at the test resize
    sy, sx = h / hw[0], w / hw[1]
    full = torch.stack(
        [
            (low[:, 0] * sx).floor(),
            (low[:, 1] * sy).floor(),
            (low[:, 2] * sx).ceil().clamp(max=w),
            (low[:, 3] * sy).ceil().clamp(max=h),
        ],
        dim=1,
    ).to(torch.int64)
    crops = []
    for m, b, f in zip(inst.pred_masks, low.tolist(), full.tolist()):
        soft = m[b[1] : b[3], b[0] : b[2]].to(torch.float32)[None, None]
        size = (f[3] - f[1], f[2] - f[0])
        crops.append(F.interpolate(soft, size=size, mode="bilinear")[0, 0] > 0.5)
    inst.pred_boxes = Boxes(full.to(torch.float32))
    kept = [k for k, c in enumerate(crops) if bool(c.any())]  # a tiny mask can vanish upscaled
    dets.add(inst[kept], pass_id, (0, 0), [crops[k] for k in kept])


def _tile_passes(
    image: Tensor, run: RunFn, settings: TileSettings, tiles: Tensor, dets: _Detections
) -> None:
    """Run the tiles, ``batch_size`` at a time; each tile's masks come back at the tile's size
    and are cropped to their boxes at once."""
    for start in range(0, len(tiles), settings.batch_size):
        batch = tiles[start : start + settings.batch_size].tolist()
        inputs = []
        for x0, y0, x1, y1 in batch:
            th, tw = y1 - y0, x1 - x0
            in_hw = (max(1, round(th * settings.scale)), max(1, round(tw * settings.scale)))
            crop = image[:, y0:y1, x0:x1]
            inputs.append({"image": resize_image(crop, in_hw), "height": th, "width": tw})
        outputs = run(inputs)
        for k, ((x0, y0, _, _), inst) in enumerate(zip(batch, outputs)):
            inst = _nonempty(inst)
            boxes = inst.pred_boxes.tensor.to(torch.int64)
            dets.add(inst, start + k, (x0, y0), _crop_masks(inst.pred_masks, boxes))
        del outputs, inputs


def _rect_overlap(a: Tensor, b: Tensor) -> Tensor:
    """(n, m) bool: whether XYXY boxes a (n, 4) and b (m, 4) share a pixel."""
    return (
        (a[:, None, 0] < b[None, :, 2])
        & (b[None, :, 0] < a[:, None, 2])
        & (a[:, None, 1] < b[None, :, 3])
        & (b[None, :, 1] < a[:, None, 3])
    )


def _intersect(a: Sequence[int], b: Sequence[int]) -> List[int]:
    return [max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])]


def _area_in(crop: Tensor, box: Sequence[int], window: Sequence[int]) -> int:
    """Pixels of a box-cropped mask inside ``window`` (image coordinates)."""
    x0, y0, x1, y1 = _intersect(box, window)
    if x1 <= x0 or y1 <= y0:
        return 0
    return int(crop[y0 - box[1] : y1 - box[1], x0 - box[0] : x1 - box[0]].sum())


def candidate_pairs(boxes: Tensor, classes: Tensor, passes: Tensor, rects: Tensor) -> Tensor:
    """Pairs of detections that may be one object: same class, different passes whose
    rectangles overlap, overlapping boxes. Compared pass pair by pass pair (a tile meets its
    neighbours and the whole image only), so the work grows with D, not D^2.

    Args:
        boxes: (D, 4) int64; classes, passes: (D,) int64; rects: (num passes, 4) int64.
    Returns:
        (P, 2) int64 detection indices, i < j.
    """
    order = torch.argsort(passes, stable=True)
    counts = torch.bincount(passes, minlength=len(rects)).tolist()
    groups = torch.split(order, counts)
    pass_pairs = _rect_overlap(rects, rects).triu(diagonal=1).nonzero().tolist()
    found = [torch.zeros((0, 2), dtype=torch.int64)]
    for p, q in pass_pairs:
        a, b = groups[p], groups[q]
        if len(a) == 0 or len(b) == 0:
            continue
        hit = _rect_overlap(boxes[a], boxes[b]) & (classes[a][:, None] == classes[b][None, :])
        ia, ib = hit.nonzero(as_tuple=True)
        found.append(torch.stack([a[ia], b[ib]], dim=1))
    pairs = torch.cat(found)
    return torch.stack([pairs.min(dim=1).values, pairs.max(dim=1).values], dim=1)


def group_matches(num: int, pairs: Tensor) -> Tensor:
    """Connected components of a graph: label propagation (each node takes the smallest label of
    its neighbours until nothing changes), vectorised over the edges.

    Args:
        num: nodes; pairs: (P, 2) int64 edges.
    Returns:
        (num,) int64 component ids 0..G-1, numbered by each component's smallest node.
    """
    labels = torch.arange(num, dtype=torch.int64)
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        while True:
            low = torch.minimum(labels[i], labels[j])
            new = labels.scatter_reduce(0, i, low, "amin").scatter_reduce(0, j, low, "amin")
            new = new[new]  # pointer jumping: follow the labels' own labels
            if torch.equal(new, labels):
                break
            labels = new
    return torch.unique(labels, return_inverse=True)[1]


def _matched(
    pairs: Tensor, boxes: Tensor, passes: Tensor, rects: Tensor, crops, thresh: float
) -> Tensor:
    """(P,) bool: the pairs whose masks' intersection, over the smaller of the two masks' areas
    inside the window both passes saw, reaches ``thresh``. A loop over the candidate pairs (few:
    objects near tile borders), each on the small crops only."""
    keep = torch.zeros(len(pairs), dtype=torch.bool)
    box_list, rect_list, pass_list = boxes.tolist(), rects.tolist(), passes.tolist()
    for k, (i, j) in enumerate(pairs.tolist()):
        bi, bj = box_list[i], box_list[j]
        window = _intersect(rect_list[pass_list[i]], rect_list[pass_list[j]])
        smaller = min(_area_in(crops[i], bi, window), _area_in(crops[j], bj, window))
        x0, y0, x1, y1 = _intersect(bi, bj)
        if smaller == 0 or x1 <= x0 or y1 <= y0:
            continue
        a = crops[i][y0 - bi[1] : y1 - bi[1], x0 - bi[0] : x1 - bi[0]]
        b = crops[j][y0 - bj[1] : y1 - bj[1], x0 - bj[0] : x1 - bj[0]]
        keep[k] = int((a & b).sum()) >= thresh * smaller
    return keep


def _merge(
    dets: _Detections, rects: Tensor, image_hw: Tuple[int, int], thresh: float, max_det: int
) -> Instances:
    """Merge the detections of all passes into the final Instances (see the module docstring)."""
    result = Instances(image_hw)
    if not dets.crops:
        result.pred_masks = torch.zeros((0, *image_hw), dtype=torch.bool)
        result.pred_boxes = Boxes(torch.zeros((0, 4)))
        result.scores = torch.zeros(0)
        result.pred_classes = torch.zeros(0, dtype=torch.int64)
        return result
    boxes, scores = torch.cat(dets.boxes), torch.cat(dets.scores)
    classes, passes = torch.cat(dets.classes), torch.cat(dets.passes)
    pairs = candidate_pairs(boxes, classes, passes, rects)
    pairs = pairs[_matched(pairs, boxes, passes, rects, dets.crops, thresh)]
    group = group_matches(len(boxes), pairs)  # (D,)
    num = int(group.max()) + 1
    g_score = torch.full((num,), -1.0).scatter_reduce(0, group, scores, "amax")
    g_class = torch.zeros(num, dtype=torch.int64).scatter(0, group, classes)
    top = torch.argsort(g_score, descending=True, stable=True)[:max_det]  # (K,)
    slot = torch.full((num,), -1, dtype=torch.int64)
    slot[top] = torch.arange(len(top))
    masks = torch.zeros((len(top), *image_hw), dtype=torch.bool)
    member_slot = slot[group]
    for d in (member_slot >= 0).nonzero()[:, 0].tolist():  # paste the final groups' members
        x0, y0, x1, y1 = boxes[d].tolist()
        masks[member_slot[d], y0:y1, x0:x1] |= dets.crops[d]
    result.pred_masks = masks
    result.pred_boxes = Boxes(masks_to_boxes(masks))  # tight: the union of the members
    result.scores = g_score[top]
    result.pred_classes = g_class[top]
    return result


def tiled_inference(
    batched_inputs: List[Dict], run: RunFn, settings: TileSettings, max_per_image: int
) -> List[Dict[str, Instances]]:
    """Tiled inference of each input (see the module docstring).

    Args:
        batched_inputs: model inputs, each with "image" (C, H, W) at **full resolution** (its
            "height" and "width", when given, must be H and W).
        run: one untiled pass of the model: inputs -> per input its Instances at the input's
            ("height", "width") with pred_masks (n, h, w) bool, pred_boxes (tight, from the
            masks), scores and pred_classes.
        settings: the tiling.
        max_per_image: detections kept per image after merging.
    Returns:
        per input ``{"instances": Instances}`` at (H, W), by descending score. An image that
        fits in one tile gets the untiled pass's result: the image at the test resize, run once.
    """
    results = []
    for x in batched_inputs:
        image = x["image"]
        h, w = image.shape[-2:]
        if (x.get("height", h), x.get("width", w)) != (h, w):
            raise ValueError(
                f"with INPUT.TILE.TEST the model takes images at full resolution: got a "
                f"{w}x{h} image for an output of {x['width']}x{x['height']} (do not resize "
                "them before the model; the data mapper and the predictors do not)"
            )
        if h <= settings.size and w <= settings.size:
            hw = test_resize_hw(h, w, settings)
            out = run([{**x, "image": resize_image(image, hw), "height": h, "width": w}])[0]
            results.append({"instances": out})
            continue
        tiles = tile_grid(h, w, settings.size, settings.overlap)
        dets = _Detections([], [], [], [], [])
        _tile_passes(image, run, settings, tiles, dets)
        rects = tiles
        if settings.whole_image:
            _whole_pass(image, run, settings, dets, len(tiles))
            rects = torch.cat([tiles, torch.tensor([[0, 0, w, h]])])
        merged = _merge(dets, rects, (h, w), settings.merge_thresh, max_per_image)
        results.append({"instances": merged})
    return results
