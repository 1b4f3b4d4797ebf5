"""See inside a SOLO-family model on one image (SOLOv2 paper, Sec. 5.1.2 and Fig. 5).

:func:`run_model` runs the model's own inference steps on one image and keeps what they
produce on the way: ``model.predict`` (head outputs), ``model.read_cells`` (every grid cell's
category scores after points NMS, and the head's own reading of a cell's soft mask) and
``model.postprocess`` (the final instances). Nothing of the heads is re-implemented: masks are
read through the variant's ``soft_mask_fn``. Only the Decoupled heads' X / Y maps are read from
the layout their ``forward_mask`` documents ((B, 2, S, h, w): X maps, then Y maps).

The pictures (:func:`write_feature_pictures`), RGB drawn with OpenCV, written atomically:

* ``mask_features.png`` (SOLOv2 heads): the E mask-feature channels, each min-max normalised
  (the paper's Fig. 5: position-sensitive channels, and channels that light up all foreground).
  ``level_masks.png`` (SOLO v1 and other heads without mask features): per level, the soft masks
  of its best-scoring cells. ``decoupled_xy.png`` (Decoupled SOLO): per level, evenly spaced X
  (column) and Y (row) maps; a cell (i, j)'s mask is Y_i * X_j.
* ``category_grids.png``: per level, the S x S grid over the padded input, each cell whose best
  class scores above ``MODEL.SOLO.SCORE_THRESH_TEST`` filled with that class's colour (opacity
  by score), as post-processing sees them (after points NMS).
* ``instance_NN.png``: for each kept instance (best score first, up to a cap), the soft mask of
  the grid cell it came from beside its final mask.

The cell of a final instance is not part of the model's output: it is recovered as the
candidate cell (same class, category score at least the final score, which maskness and Matrix
NMS only lower) whose thresholded mask, resized by the model's own ``resize_masks``, overlaps
the final mask most (IoU 1.0 but for float rounding; the picture shows it when lower).

Shape shorthand: E mask-feature channels, G grid cells of all levels, C classes, S_l grid size of
level l, Hf x Wf the soft-mask size (padded canvas / mask stride), h x w the model input.
"""

import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.structures import Instances
from detectron2.utils.colormap import colormap

from ..atomic_io import atomic_write_bytes
from ..modeling.heads import DecoupledSOLOInstanceHead
from ..modeling.postprocessing import cell_levels, resize_masks

__all__ = [
    "ModelView",
    "run_model",
    "instance_cells",
    "normalize_channels",
    "colorize",
    "mosaic",
    "draw_mask_features",
    "draw_level_masks",
    "draw_decoupled_maps",
    "draw_category_grids",
    "draw_instance",
    "write_feature_pictures",
    "class_colors",
]

MAX_INSTANCES = 8  # instance pictures written by default
CELLS_PER_LEVEL = 8  # level_masks.png: best cells drawn per level
MAPS_PER_BRANCH = 12  # decoupled_xy.png: X and Y maps drawn per level
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass
class ModelView:
    """What :func:`run_model` keeps of one image's inference."""

    image: np.ndarray  # (h, w, 3) uint8 RGB model input (the image after the test resize)
    canvas_hw: Tuple[int, int]  # (Hc, Wc) padded canvas; grid cells divide it
    mask_stride: int  # stride of the soft masks
    outputs: tuple  # model.predict's (cate_logits, mask_preds, mask_feat), a batch of one
    cate: torch.Tensor  # (G, C) category probabilities after points NMS (model.read_cells)
    soft_masks: Callable[[torch.Tensor], torch.Tensor]  # cells (n,) -> (n, Hf, Wf), the head's
    instances: Instances  # the final instances at the input size (model.postprocess), on the CPU
    num_grids: List[int]  # S_l per level
    level_names: List[str]  # "P2" ... per level
    score_threshold: float  # the model's inference thresholds
    mask_threshold: float


@torch.no_grad()
def run_model(model: torch.nn.Module, image: np.ndarray, input_format: str = "BGR") -> ModelView:
    """Run ``model`` (a solo_d2 SOLO META_ARCH, eval mode) on one already resized image.

    Args:
        image: (h, w, 3) uint8 in ``input_format`` (the model's INPUT.FORMAT), at the test size.
    """
    model.eval()
    h, w = image.shape[:2]
    tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))
    inputs = [{"image": tensor, "height": h, "width": w}]
    images = model.preprocess_image(inputs)
    canvas_hw = tuple(images.tensor.shape[-2:])
    outputs = model.predict(images.tensor)
    cate, soft_masks = model.read_cells(outputs, canvas_hw)
    instances = model.postprocess(images, outputs, inputs)[0]["instances"]
    rgb = image[:, :, ::-1] if input_format == "BGR" else image
    return ModelView(
        image=np.ascontiguousarray(rgb),
        canvas_hw=canvas_hw,
        mask_stride=model.mask_stride,
        outputs=outputs,
        cate=cate[0],
        soft_masks=soft_masks[0],
        instances=instances.to("cpu"),
        num_grids=list(model.ins_head.num_grids),
        level_names=[f.upper() for f in model.instance_in_features],
        score_threshold=model.inference_args["score_threshold"],
        mask_threshold=model.inference_args["mask_threshold"],
    )


@torch.no_grad()
def instance_cells(view: ModelView, count: int, chunk: int = 16) -> Tuple[np.ndarray, np.ndarray]:
    """The grid cell each of the first ``count`` final instances came from (module docstring).

    Returns:
        cells: (n,) int64 indices into the G cells (-1: none found); ious: (n,) float IoU of the
        cell's mask with the final mask. n = min(count, number of instances).
    """
    inst = view.instances[:count]
    hw = tuple(view.image.shape[:2])
    cells, ious = np.full(len(inst), -1, dtype=np.int64), np.zeros(len(inst))
    for k in range(len(inst)):  # a handful of instances
        label, score = int(inst.pred_classes[k]), float(inst.scores[k])
        column = view.cate[:, label]
        ok = (column >= score * (1 - 1e-5)) & (column > view.score_threshold)
        candidates = ok.nonzero()[:, 0]
        candidates = candidates[torch.argsort(column[candidates], descending=True, stable=True)]
        final = inst.pred_masks[k].to(view.cate.device).flatten()
        best = (-1.0, -1)
        for start in range(0, len(candidates), chunk):
            part = candidates[start : start + chunk]
            masks = resize_masks(
                view.soft_masks(part), view.canvas_hw, hw, hw, view.mask_threshold
            ).flatten(1)
            inter = (masks & final).sum(1).float()
            union = (masks | final).sum(1).float().clamp(min=1)
            iou = inter / union
            i = int(iou.argmax())
            if float(iou[i]) > best[0]:
                best = (float(iou[i]), int(part[i]))
        ious[k], cells[k] = best[0] if best[1] >= 0 else 0.0, best[1]
    return cells, ious


# ---- pure drawing helpers ---------------------------------------------------------------------


def normalize_channels(x: np.ndarray) -> np.ndarray:
    """(N, h, w) float -> (N, h, w) float32 in [0, 1], each map min-max normalised on its own
    (a constant map becomes 0)."""
    x = x.astype(np.float32)
    lo = x.min(axis=(1, 2), keepdims=True)
    span = x.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (x - lo) / np.where(span > 0, span, 1), 0).astype(np.float32)


def colorize(x: np.ndarray) -> np.ndarray:
    """(..., h, w) values in [0, 1] -> (..., h, w, 3) uint8 RGB, viridis colour map."""
    u8 = np.clip(np.nan_to_num(x) * 255 + 0.5, 0, 255).astype(np.uint8)
    flat = u8.reshape(-1, u8.shape[-1])
    bgr = cv2.applyColorMap(flat, cv2.COLORMAP_VIRIDIS)  # (rows, w, 3)
    return np.ascontiguousarray(bgr[..., ::-1].reshape(*u8.shape, 3))


def mosaic(tiles: np.ndarray, cols: int, pad: int = 2, background: int = 255) -> np.ndarray:
    """(N, h, w, 3) uint8 tiles -> one (rows * (h + pad) - pad, cols * (w + pad) - pad, 3) image,
    row-major, empty places and the gaps in ``background``."""
    n, h, w, c = tiles.shape
    rows = max(1, math.ceil(n / cols))
    full = np.full((rows * cols, h + pad, w + pad, c), background, dtype=np.uint8)
    full[:n, :h, :w] = tiles
    grid = full.reshape(rows, cols, h + pad, w + pad, c).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(grid.reshape(rows * (h + pad), cols * (w + pad), c)[:-pad, :-pad])


def _resize(x: np.ndarray, hw: Tuple[int, int], nearest: bool = False) -> np.ndarray:
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(x, (hw[1], hw[0]), interpolation=interp)


def _fit(hw: Tuple[int, int], longest: int) -> Tuple[int, int]:
    scale = longest / max(hw)
    return max(1, int(round(hw[0] * scale))), max(1, int(round(hw[1] * scale)))


def _text(img: np.ndarray, text: str, org: Tuple[int, int], scale: float = 0.4) -> None:
    """Write ``text`` at ``org`` (x, y of the baseline) in white on a black box, in place."""
    (tw, th), base = cv2.getTextSize(text, FONT, scale, 1)
    x, y = org
    cv2.rectangle(img, (x - 2, y - th - 2), (x + tw + 1, y + base - 1), (0, 0, 0), -1)
    cv2.putText(img, text, org, FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)


def _header(img: np.ndarray, text: str, height: int = 22) -> np.ndarray:
    """``img`` with a white band above it holding ``text`` in black."""
    band = np.full((height, img.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(band, text, (4, height - 7), FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, img])


def _labelled_tiles(maps: np.ndarray, labels: Sequence[str], tile: int) -> np.ndarray:
    """(N, h, w) values in [0, 1] -> (N, th, tw, 3) colourised tiles of longest side ``tile``,
    each with its label in the top-left corner."""
    th, tw = _fit(maps.shape[1:], tile)
    tiles = colorize(np.stack([_resize(m, (th, tw)) for m in maps])) if len(maps) else None
    if tiles is None:
        return np.zeros((0, th, tw, 3), dtype=np.uint8)
    for t, label in zip(tiles, labels):
        _text(t, label, (2, 11), 0.33)
    return tiles


def _stack_rows(rows: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """(h_i, w_i, 3) uint8 images one below the other, left-aligned, ``gap`` white pixels
    between them and white to the right of the narrower ones."""
    width = max(r.shape[1] for r in rows)
    padded = [
        np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows
    ]
    return np.concatenate(padded)[:-gap]


def class_colors(num_classes: int, colors: Optional[Sequence] = None) -> np.ndarray:
    """(C, 3) uint8 RGB: ``colors`` (e.g. metadata thing_colors) where given, else detectron2's
    fixed colour map."""
    palette = colormap(rgb=True, maximum=255)
    out = np.array([palette[i % len(palette)] for i in range(num_classes)], dtype=np.float64)
    if colors:
        known = np.asarray(colors, dtype=np.float64)[:num_classes]
        out[: len(known)] = known
    return out.astype(np.uint8)


def _image_region(hw: Tuple[int, int], stride: int) -> Tuple[int, int]:
    """Size at ``stride`` of the image's own region of the padded canvas."""
    return max(1, math.ceil(hw[0] / stride)), max(1, math.ceil(hw[1] / stride))


def _level_maps(view: ModelView, level: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per-cell best scores (S, S) and classes (S, S) of ``level``."""
    sizes = [s * s for s in view.num_grids]
    start = sum(sizes[:level])
    s = view.num_grids[level]
    block = view.cate[start : start + sizes[level]].float().cpu()  # (S*S, C)
    best, label = block.max(dim=1)
    return best.view(s, s).numpy(), label.view(s, s).numpy()


# ---- the pictures -----------------------------------------------------------------------------


def draw_mask_features(view: ModelView, tile: int = 96, cols: Optional[int] = None) -> np.ndarray:
    """SOLOv2's (E, Hf, Wf) mask features as a grid of E min-max normalised channels, each cropped
    to the image's region and labelled with its index. Returns (H, W, 3) uint8 RGB."""
    feat = view.outputs[2][0]  # (E, Hf, Wf)
    rh, rw = _image_region(view.image.shape[:2], view.mask_stride)
    maps = normalize_channels(feat[:, :rh, :rw].float().cpu().numpy())
    tiles = _labelled_tiles(maps, [str(i) for i in range(len(maps))], tile)
    cols = cols or math.ceil(math.sqrt(len(maps)))
    return _header(mosaic(tiles, cols), f"{len(maps)} mask-feature channels (min-max each)")


def draw_level_masks(
    view: ModelView, per_level: int = CELLS_PER_LEVEL, tile: int = 96
) -> np.ndarray:
    """Per level (a row), the soft masks of its ``per_level`` best-scoring cells, read by the
    head (``soft_mask_fn``), labelled "P3 (i,j) score". Returns (H, W, 3) uint8 RGB."""
    rh, rw = _image_region(view.image.shape[:2], view.mask_stride)
    rows = []
    offset = 0
    for level, s in enumerate(view.num_grids):
        best, _ = _level_maps(view, level)
        order = np.argsort(-best.reshape(-1), kind="stable")[:per_level]
        cells = torch.as_tensor(order + offset, dtype=torch.int64, device=view.cate.device)
        maps = view.soft_masks(cells)[:, :rh, :rw].float().cpu().numpy()
        labels = [
            f"{view.level_names[level]} ({c // s},{c % s}) {best.reshape(-1)[c]:.2f}" for c in order
        ]
        rows.append(mosaic(_labelled_tiles(np.clip(maps, 0, 1), labels, tile), per_level))
        offset += s * s
    return _header(_stack_rows(rows), f"soft masks of each level's {per_level} best cells (0 to 1)")


def draw_decoupled_maps(
    view: ModelView, per_branch: int = MAPS_PER_BRANCH, tile: int = 72
) -> np.ndarray:
    """Decoupled SOLO: per level, two rows: ``per_branch`` evenly spaced X (column) maps X_j and
    Y (row) maps Y_i, sigmoid (0 to 1). Returns (H, W, 3) uint8 RGB."""
    rows = []
    hw = view.image.shape[:2]
    for level, pred in enumerate(view.outputs[1]):
        s = view.num_grids[level]
        if pred.dim() != 5 or pred.shape[1] != 2:
            raise ValueError(
                f"level {level}: expected Decoupled mask predictions (B, 2, S, h, w), got "
                f"{tuple(pred.shape)}"
            )
        stride = max(1, round(view.canvas_hw[0] / pred.shape[-2]))
        rh, rw = _image_region(hw, stride)
        pick = np.unique(np.linspace(0, s - 1, min(per_branch, s)).round().astype(np.int64))
        probs = pred[0][:, pick, :rh, :rw].sigmoid().float().cpu().numpy()  # (2, k, rh, rw)
        name = view.level_names[level]
        for branch, letter in ((0, "X"), (1, "Y")):
            labels = [f"{name} {letter}{j}" for j in pick]
            rows.append(mosaic(_labelled_tiles(probs[branch], labels, tile), per_branch))
    title = "Decoupled SOLO: X_j (columns) and Y_i (rows) maps per level; mask(i,j) = Y_i * X_j"
    return _header(_stack_rows(rows), title)


def draw_category_grids(
    view: ModelView, class_names: Sequence[str], colors: np.ndarray, panel: int = 320
) -> np.ndarray:
    """Per level, the grid over the padded input with the cells above the score threshold filled
    in their best class's colour, opacity by score. Returns (H, W, 3) uint8 RGB."""
    hc, wc = view.canvas_hw
    canvas = np.zeros((hc, wc, 3), dtype=np.uint8)
    canvas[: view.image.shape[0], : view.image.shape[1]] = view.image
    ph, pw = _fit((hc, wc), panel)
    base = _resize(canvas, (ph, pw)).astype(np.float32)
    panels, fired = [], set()
    for level, s in enumerate(view.num_grids):
        best, label = _level_maps(view, level)
        on = best > view.score_threshold
        fired.update(label[on].tolist())
        alpha = np.where(on, 0.35 + 0.6 * np.clip(best, 0, 1), 0.0)[..., None]  # (S, S, 1)
        color = colors[label].astype(np.float32)  # (S, S, 3)
        alpha = _resize(alpha.astype(np.float32), (ph, pw), nearest=True)[..., None]
        color = _resize(color, (ph, pw), nearest=True)
        img = (base * (1 - alpha) + color * alpha).clip(0, 255).astype(np.uint8)
        for k in range(1, s):  # grid lines
            x, y = round(k * pw / s), round(k * ph / s)
            cv2.line(img, (x, 0), (x, ph - 1), (200, 200, 200), 1)
            cv2.line(img, (0, y), (pw - 1, y), (200, 200, 200), 1)
        title = f"{view.level_names[level]}  S={s}  {int(on.sum())} cells"
        panels.append(_header(img, title))
    row = mosaic(np.stack(panels), len(panels), pad=6)
    legend = np.full((24, row.shape[1], 3), 255, dtype=np.uint8)
    x = 4
    for c in sorted(fired):
        cv2.rectangle(legend, (x, 6), (x + 12, 18), tuple(int(v) for v in colors[c]), -1)
        name = class_names[c] if c < len(class_names) else f"class_{c}"
        cv2.putText(legend, name, (x + 16, 17), FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        x += 24 + 8 * len(name)
    note = f"cells scoring above {view.score_threshold:g} after points NMS"
    cv2.putText(legend, note, (max(x + 8, row.shape[1] - 8 * len(note)), 17), FONT, 0.4,
                (90, 90, 90), 1, cv2.LINE_AA)  # fmt: skip
    return np.concatenate([row, legend])


def draw_instance(
    view: ModelView, k: int, cell: int, iou: float, class_names: Sequence[str], color: np.ndarray
) -> np.ndarray:
    """Instance ``k``: its cell's soft mask (0 to 1, upsampled to the input) beside its final
    mask in its class colour over the dimmed input. Returns (h + header, 2 w + gap, 3) uint8 RGB."""
    h, w = view.image.shape[:2]
    inst = view.instances
    label, score = int(inst.pred_classes[k]), float(inst.scores[k])
    name = class_names[label] if label < len(class_names) else f"class_{label}"
    if cell >= 0:
        cells = torch.tensor([cell], device=view.cate.device)
        soft = view.soft_masks(cells)[None].float()  # (1, 1, Hf, Wf)
        soft = F.interpolate(soft, size=view.canvas_hw, mode="bilinear")[0, 0, :h, :w]
        left = colorize(soft.clamp(0, 1).cpu().numpy())
        level, local = cell_levels(cells, view.num_grids)
        s = view.num_grids[int(level)]
        where = f"{view.level_names[int(level)]} cell ({int(local) // s},{int(local) % s})"
        left_title = f"soft mask of {where}" + (f", IoU {iou:.2f}" if iou < 0.995 else "")
    else:
        left, left_title = np.zeros((h, w, 3), dtype=np.uint8), "cell not found"
    mask = inst.pred_masks[k].numpy()
    right = view.image.astype(np.float32) * 0.5  # the rest dimmed
    right[mask] = 0.9 * right[mask] + 0.55 * color.astype(np.float32)
    right = right.astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(right, contours, -1, (255, 255, 255), 1)
    gap = np.full((h, 6, 3), 255, dtype=np.uint8)
    body = np.concatenate([left, gap, right], axis=1)
    if body.shape[1] < 420:  # room for the titles
        scale = 420 / body.shape[1]
        body = _resize(body, (round(h * scale), 420))
    head = np.full((36, body.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(head, f"#{k} {name} {score:.2f}", (4, 14), FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(head, left_title, (4, 31), FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    x = body.shape[1] // 2 + 4
    cv2.putText(head, "final mask", (x, 31), FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([head, body])


def _write_png(path: str, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise ValueError(f"could not encode {path} as PNG")
    atomic_write_bytes(path, data.tobytes())


def write_feature_pictures(
    model: torch.nn.Module,
    image: np.ndarray,
    out_dir: str,
    *,
    input_format: str = "BGR",
    class_names: Sequence[str] = (),
    colors: Optional[Sequence] = None,
    max_instances: int = MAX_INSTANCES,
    tile: int = 96,
    panel: int = 320,
) -> Dict:
    """Run ``model`` on ``image`` and write the pictures of the module docstring into ``out_dir``
    (which must exist).

    Args:
        model: a solo_d2 SOLO META_ARCH in eval mode.
        image: (h, w, 3) uint8 in ``input_format``, already resized to the test size.
        class_names, colors: per class id (metadata thing_classes / thing_colors), optional.
        max_instances: instance pictures written at most (best scores first).
        tile, panel: longest side in pixels of a channel tile and of a category-grid panel.
    Returns:
        {"head", "files" (names written, in order), "instances": per drawn instance its "class",
        "score", "level", "cell" [i, j] and "iou"} (plain values, for a JSON summary).
    """
    view = run_model(model, image, input_format)
    head = model.ins_head
    num_classes = head.num_classes
    palette = class_colors(num_classes, colors)
    names = list(class_names) + [f"class_{i}" for i in range(len(class_names), num_classes)]
    files = []

    def write(name: str, rgb: np.ndarray) -> None:
        _write_png(os.path.join(out_dir, name), rgb)
        files.append(name)

    if head.uses_mask_features:
        write("mask_features.png", draw_mask_features(view, tile))
    elif isinstance(head, DecoupledSOLOInstanceHead):  # and its light variant: X / Y maps
        write("decoupled_xy.png", draw_decoupled_maps(view, tile=max(tile * 3 // 4, 24)))
    else:
        write("level_masks.png", draw_level_masks(view, tile=tile))
    write("category_grids.png", draw_category_grids(view, names, palette, panel))
    cells, ious = instance_cells(view, max_instances)
    drawn = []
    for k, (cell, iou) in enumerate(zip(cells.tolist(), ious.tolist())):
        label = int(view.instances.pred_classes[k])
        write(f"instance_{k:02d}.png", draw_instance(view, k, cell, iou, names, palette[label]))
        record = {"class": names[label], "score": round(float(view.instances.scores[k]), 4)}
        if cell >= 0:
            level, local = cell_levels(torch.tensor([cell]), view.num_grids)
            s = view.num_grids[int(level)]
            record.update(
                level=view.level_names[int(level)],
                cell=[int(local) // s, int(local) % s],
                iou=round(iou, 4),
            )
        drawn.append(record)
    return {
        "head": type(head).__name__,
        "input_hw": list(view.image.shape[:2]),
        "num_instances": len(view.instances),
        "files": files,
        "instances": drawn,
    }
