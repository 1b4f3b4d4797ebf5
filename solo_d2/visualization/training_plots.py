"""Training plots: the loss curves of ``metrics.json`` and per-class AP bar charts.

The :class:`~solo_d2.engine.Trainer` writes them into ``OUTPUT_DIR`` after evaluations and at the
end of training when ``TEST.SAVE_PLOTS`` is True (the default):

* ``loss_curve.png``: every logged loss (``total_loss``, ``loss_cls``, ``loss_mask``, ...) per
  iteration, from detectron2's ``metrics.json`` (losses there are medians of the last 20
  iterations);
* ``per_class_ap_<dataset>.png``: mask ("segm") and box ("bbox") AP of every class, from the
  ``"AP-<class name>"`` keys of detectron2's COCOEvaluator results.

Figures use matplotlib's object-oriented API on its Agg canvas: no pyplot, no global backend
change, no display needed. Files are written atomically (:mod:`solo_d2.atomic_io`).
"""

import io
import json
import math
from typing import Dict, List, Mapping, Tuple

import numpy as np

from ..atomic_io import atomic_write_bytes

__all__ = [
    "LOSS_CURVE_FILE",
    "per_class_ap_file",
    "read_metrics",
    "loss_series",
    "plot_loss_curve",
    "per_class_ap",
    "plot_per_class_ap",
    "save_figure",
]

LOSS_CURVE_FILE = "loss_curve.png"
# Per-class AP charts with more classes show the lowest and the highest this many of them.
AP_CHART_MAX_CLASSES = 40
AP_TASKS = ("segm", "bbox")


def per_class_ap_file(dataset_name: str) -> str:
    """File name of the per-class AP chart of ``dataset_name``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset_name)
    return f"per_class_ap_{safe}.png"


def new_figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas (no pyplot state), size in inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str, dpi: int = 100) -> None:
    """Render ``fig`` as PNG and write it to ``path`` atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())


def read_metrics(metrics_file: str) -> List[dict]:
    """The records of detectron2's ``metrics.json`` (one JSON object per line).

    A line that is not a complete JSON object (the partial last line of a killed run) ends the
    reading. Records without an "iteration" are skipped.
    """
    records = []
    with open(metrics_file, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                break
            if isinstance(record, dict) and "iteration" in record:
                records.append(record)
    return records


def _is_loss(key: str) -> bool:
    return key == "total_loss" or key.startswith("loss")


def loss_series(records: List[dict]) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Every logged loss as (iterations, values), iterations increasing.

    An iteration logged twice (a resumed run that was not trimmed) keeps its last value.

    Returns:
        {loss name: ((n,) int64 iterations, (n,) float64 values)}, "total_loss" first.
    """
    keys = sorted(
        {k for r in records for k in r if _is_loss(k)}, key=lambda k: (k != "total_loss", k)
    )
    series = {}
    for key in keys:
        rows = [(r["iteration"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        iters = np.array([i for i, _ in rows], dtype=np.int64)
        values = np.array([v for _, v in rows], dtype=np.float64)
        # last occurrence of each iteration: unique over the reversed arrays
        uniq, first_in_reversed = np.unique(iters[::-1], return_index=True)
        series[key] = (uniq, values[::-1][first_in_reversed])
    return series


def plot_loss_curve(metrics_file: str, out_png: str) -> Dict[str, List[Tuple[int, float]]]:
    """Plot every logged loss of ``metrics_file`` per iteration into ``out_png``.

    Returns:
        {loss name: [(iteration, value), ...]} as plotted; empty (and nothing written) when the
        file logs no loss.
    """
    series = loss_series(read_metrics(metrics_file))
    if not series:
        return {}
    fig = new_figure(6.4, 3.6)
    ax = fig.add_subplot()
    for key, (iters, values) in series.items():
        ax.plot(iters, values, label=key, linewidth=2.0 if key == "total_loss" else 1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (median of 20 iterations)")
    ax.set_title("Training losses")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, out_png)
    return {k: list(zip(i.tolist(), v.tolist())) for k, (i, v) in series.items()}


def per_class_ap(results: Mapping) -> Dict[str, Dict[str, float]]:
    """Per-class AP of COCOEvaluator results.

    Args:
        results: one dataset's results, {"segm": {"AP": .., "AP-<class>": ..}, "bbox": {..}}.
    Returns:
        {task: {class name: AP (NaN: class absent from the evaluation data)}} for the tasks of
        ``AP_TASKS`` that have per-class keys, in the results' class order.
    """
    out = {}
    if not isinstance(results, Mapping):
        return out
    for task in AP_TASKS:
        metrics = results.get(task)
        if not isinstance(metrics, Mapping):
            continue
        per_class = {
            k[3:]: float("nan") if v is None else float(v)
            for k, v in metrics.items()
            if k.startswith("AP-") and (v is None or isinstance(v, (int, float)))
        }
        if per_class:
            out[task] = per_class
    return out


def plot_per_class_ap(results: Mapping, out_png: str, title: str = "") -> bool:
    """Horizontal bar chart of each class's AP (one bar per task) into ``out_png``.

    With more than ``AP_CHART_MAX_CLASSES`` classes, the lowest and highest half of that many (by
    the first task's AP) are shown. Classes without AP (absent from the data) are marked "n/a".

    Returns:
        False (nothing written) when ``results`` has no per-class AP.
    """
    aps = per_class_ap(results)
    if not aps:
        return False
    tasks = list(aps)
    names = list(aps[tasks[0]])
    table = np.array([[aps[t].get(n, math.nan) for n in names] for t in tasks])  # (T, K)
    note = ""
    if len(names) > AP_CHART_MAX_CLASSES:
        half = AP_CHART_MAX_CLASSES // 2
        order = np.argsort(np.nan_to_num(table[0], nan=-1.0), kind="stable")
        shown = np.concatenate([order[:half], order[-half:]])
        note = f" ({half} lowest and {half} highest of {len(names)} classes)"
        names = [names[i] for i in shown]
        table = table[:, shown]
    k = len(names)
    fig = new_figure(6.4, 1.4 + 0.32 * k * len(tasks) ** 0.5)
    ax = fig.add_subplot()
    height = 0.8 / len(tasks)
    rows = np.arange(k)
    for t, task in enumerate(tasks):
        y = rows + (t - (len(tasks) - 1) / 2) * height
        ax.barh(y, np.nan_to_num(table[t]), height=height, label=f"{task} AP")
        for yi, value in zip(y, table[t]):
            text = "n/a" if math.isnan(value) else f"{value:.1f}"
            ax.text(max(np.nan_to_num(value), 0) + 0.5, yi, text, va="center", fontsize=7)
    ax.set_yticks(rows, names, fontsize=8 if k <= 20 else 6)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("AP (COCO, IoU 0.50:0.95)")
    ax.set_title((title or "Per-class AP") + note, fontsize=10)
    ax.legend(fontsize="small", loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out_png)
    return True
