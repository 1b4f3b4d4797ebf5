"""What 1203 LVIS classes cost a SOLOv2 at inference, against COCO's 80 (CPU or GPU).

Measured for each class count C (``python -m dev.benchmark.lvis_classes`` is the command line; the
results and their reading are in docs/lvis.md):

* ``cate_pred``: the category branch's last conv (3x3, ``channels`` -> C), the only layer whose
  size depends on C, on the S x S grids of all levels (SOLOv2: 40, 36, 24, 16, 12: 3872 cells);
  its output is (G, C) logits;
* ``points_nms``: sigmoid + points NMS + concatenation of the levels (``category_scores``);
* ``threshold``: the (cell, class) pairs above the score threshold (a ``nonzero`` over G x C);
* ``matrix_nms``: Matrix NMS on ``nms_masks`` masks of ``mask_hw`` with labels drawn from C
  classes (its cost is N x N, not C);
* ``postprocess_dup_k``: ``solo_postprocess`` with ``cells`` cells passing the threshold in k
  classes each (k = 1 and ``dup``): the soft mask of a cell is computed once however many
  classes it passes in, but Matrix NMS and the final masks see k candidates per cell. With many
  similar classes (LVIS has synonyms and near-synonyms) k > 1 becomes likely.

Timings are medians (:func:`~dev.benchmark.timing.measure`), with the process's peak memory
increase during each; weights and features are random (cost does not depend on their values,
only on the shapes and the candidates).
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch
from torch import nn

from solo_d2.modeling.postprocessing import (
    category_scores,
    cell_strides,
    matrix_nms,
    solo_postprocess,
)

from .inputs import matrix_nms_inputs
from .timing import machine_info, measure

__all__ = ["LVISCostSettings", "measure_lvis_cost", "format_lvis_cost"]


@dataclass
class LVISCostSettings:
    """Input sizes of :func:`measure_lvis_cost` (defaults: SOLOv2 R50 at 800 x 1216)."""

    classes: Sequence[int] = (80, 1203)
    num_grids: Sequence[int] = (40, 36, 24, 16, 12)
    strides: Sequence[int] = (8, 8, 16, 32, 32)
    channels: int = 512  # input width of cate_pred (the category tower's width)
    mask_hw: Sequence[int] = (200, 304)  # mask features at stride 4 of an 800 x 1216 input
    kernel_dim: int = 256  # E: mask-feature channels, dynamic kernel length
    nms_masks: int = 500  # NMS_PRE_TOPK
    cells: int = 100  # cells passing the score threshold (postprocess_dup_k)
    dup: int = 4  # classes each of those cells passes in, for the k > 1 case
    score_threshold: float = 0.1
    repeats: int = 5
    warmup: int = 1
    threads: int = 1
    seed: int = 0
    results: Dict = field(default_factory=dict)


def _postprocess_inputs(s: LVISCostSettings, num_classes: int, k: int, g: torch.Generator):
    """Category scores where ``s.cells`` cells pass in ``k`` classes each, and a SOLOv2-like
    soft-mask function (dynamic 1x1 kernels on random mask features)."""
    num_cells = sum(n * n for n in s.num_grids)
    scores = torch.full((num_cells, num_classes), 0.01)
    cells = torch.randperm(num_cells, generator=g)[: s.cells]
    for j in range(k):
        classes = torch.randint(0, num_classes, (s.cells,), generator=g)
        scores[cells, classes] = 0.3 + 0.6 * torch.rand(s.cells, generator=g) - 0.01 * j
    kernels = torch.randn(num_cells, s.kernel_dim, generator=g) / s.kernel_dim**0.5
    feats = torch.randn(s.kernel_dim, s.mask_hw[0] * s.mask_hw[1], generator=g)
    calls: List[int] = []

    def soft_masks(idx: torch.Tensor) -> torch.Tensor:
        calls.append(len(idx))
        return torch.sigmoid(3 * kernels[idx] @ feats).view(len(idx), *s.mask_hw)

    return scores, soft_masks, calls


def measure_lvis_cost(s: LVISCostSettings) -> Dict:
    """Run every measurement (see the module docstring); the results, with the machine."""
    torch.set_num_threads(s.threads)
    device = torch.device("cpu")
    g = torch.Generator().manual_seed(s.seed)
    out: Dict = {
        "machine": machine_info(device),
        "settings": dataclasses.asdict(s),
        "by_classes": {},
    }
    out["settings"].pop("results")
    strides = cell_strides(s.num_grids, s.strides)
    canvas = (s.mask_hw[0] * 4, s.mask_hw[1] * 4)
    timing = {"repeats": s.repeats, "warmup": s.warmup, "device": device}
    for c in s.classes:
        row: Dict = {}
        conv = nn.Conv2d(s.channels, c, 3, padding=1).eval()
        feats = [torch.randn(1, s.channels, n, n, generator=g) for n in s.num_grids]
        with torch.no_grad():
            row["cate_pred"] = measure(
                lambda conv=conv, feats=feats: [conv(x) for x in feats], **timing
            )
            logits = [conv(x) - 4.0 for x in feats]
        row["cate_pred"]["params_mb"] = round(
            sum(p.numel() for p in conv.parameters()) * 4 / 2**20, 2
        )
        row["points_nms"] = measure(lambda logits=logits: category_scores(logits), **timing)
        cate = category_scores(logits)[0]
        row["threshold"] = measure(
            lambda cate=cate: (cate > s.score_threshold).nonzero(as_tuple=True), **timing
        )
        labels, masks, areas, scores = matrix_nms_inputs(s.nms_masks, *s.mask_hw, seed=s.seed)
        labels = torch.randint(0, c, labels.shape, generator=g)
        nms_args = (labels, masks, areas, scores)
        row["matrix_nms"] = measure(lambda nms_args=nms_args: matrix_nms(*nms_args), **timing)
        for k in sorted({1, s.dup}):
            scores_k, soft_masks, calls = _postprocess_inputs(s, c, k, g)

            def run(scores_k=scores_k, soft_masks=soft_masks):
                return solo_postprocess(
                    scores_k, soft_masks, strides, canvas, canvas, canvas,
                    score_threshold=s.score_threshold, mask_threshold=0.5,
                    nms_pre=s.nms_masks, update_threshold=0.05, nms_type="matrix",
                    nms_kernel="gaussian", nms_sigma=2.0, max_per_image=300, chunk_size=256,
                )  # fmt: skip

            row[f"postprocess_dup_{k}"] = measure(run, **timing)
            runs = s.repeats + s.warmup
            row[f"postprocess_dup_{k}"]["soft_masks_per_run"] = sum(calls) // runs
        out["by_classes"][c] = row
    return out


def format_lvis_cost(result: Dict) -> str:
    """A Markdown table of :func:`measure_lvis_cost`'s medians (ms) and peak memory (MB)."""
    m, s = result["machine"], result["settings"]
    lines = [
        f"Machine: {m['cpu']}, {m['cpu_cores']} cores, torch {m['torch']}, "
        f"{m['torch_threads']} thread(s), load {m['load_average']}",
        f"Grids {list(s['num_grids'])} ({sum(n * n for n in s['num_grids'])} cells), "
        f"cate_pred {s['channels']} -> C channels, masks {s['mask_hw'][0]}x{s['mask_hw'][1]}, "
        f"E={s['kernel_dim']}, Matrix NMS on {s['nms_masks']} masks, post-processing with "
        f"{s['cells']} passing cells x k classes; medians of {s['repeats']} runs",
        "",
        "| stage | " + " | ".join(f"C={c} ms (peak MB)" for c in result["by_classes"]) + " |",
        "|---|" + "---|" * len(result["by_classes"]),
    ]
    stages = next(iter(result["by_classes"].values())).keys()
    for stage in stages:
        cells = []
        for row in result["by_classes"].values():
            r = row[stage]
            extra = f", {r['soft_masks_per_run']} masks" if "soft_masks_per_run" in r else ""
            cells.append(f"{r['median_s'] * 1000:.1f} ({r['peak_mem_mb']:.0f}{extra})")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
