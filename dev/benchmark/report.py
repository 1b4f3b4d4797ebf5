"""The text report of a benchmark run: the machine, then one row per measurement."""

import json
from typing import Dict, List, Tuple

__all__ = ["format_report", "measurements"]

# input sizes and counts shown beside a measurement's times
_NOTES = (
    "batch",
    "height",
    "width",
    "masks",
    "candidates",
    "detections",
    "images_per_s",
    "positive_samples",
    "ratio",
    "max_score_diff",
    "min_mask_iou",
    "max_loss_rel_diff",
)


def measurements(results: Dict[str, Dict]) -> List[Tuple[str, Dict]]:
    """(name, timing) of every timed measurement: ``stage`` or ``stage/measurement``."""
    rows = []
    for stage, res in results.items():
        for key, r in res.items():
            if isinstance(r, dict) and "median_s" in r:
                rows.append((stage if key == stage else f"{stage}/{key}", r))
    return rows


def _fmt_s(s: float) -> str:
    return f"{s * 1000:.2f} ms" if s < 1 else f"{s:.3f} s"


def format_report(report: Dict) -> str:
    """The report as text.

    Args:
        report: {"machine": :func:`.timing.machine_info`, "settings": the settings as a dict,
            "results": {stage: what :func:`.stages.run_stage` returned}, "load_average":
            {stage: [1-minute load at its start, at its end]}}.
    """
    m, settings = report["machine"], report["settings"]
    lines = [
        f"machine: {m['cpu']}, {m['cpu_cores']} cores ({m['cpu_cores_usable']} usable), "
        f"{m.get('gpu', 'no GPU used')}; torch {m['torch']}, {m['torch_threads']} threads, "
        f"device {m['device']}, dtype float32"
        + (", channels-last" if settings["channels_last"] else ", NCHW"),
        f"config: {settings['config_file']}, weights: {settings['weights'] or 'random init'}",
        f"{'measurement':44s} {'median':>10s} {'min':>10s} {'CPU med.':>10s} {'n':>3s} "
        f"{'peak MB':>8s}  notes",
    ]
    for name, r in measurements(report["results"]):
        notes = [
            f"{k}={r[k]:.3g}" if isinstance(r[k], float) else f"{k}={r[k]}"
            for k in _NOTES
            if k in r
        ]
        peak = f"{r['peak_mem_mb']:.1f}" if "peak_mem_mb" in r else "-"
        cpu_s = _fmt_s(r["cpu_median_s"]) if "cpu_median_s" in r else "-"
        lines.append(
            f"{name:44s} {_fmt_s(r['median_s']):>10s} {_fmt_s(r['min_s']):>10s} {cpu_s:>10s} "
            f"{r['repeats']:>3d} {peak:>8s}  {', '.join(notes)}"
        )
    for stage, res in report["results"].items():
        extra = {k: v for k, v in res.items() if not (isinstance(v, dict) and "median_s" in v)}
        if extra:
            lines.append(f"{stage}: " + json.dumps(extra, default=str))
    loads = report.get("load_average", {})
    if loads:
        lines.append(
            "load average (1 min) at each stage start/end: "
            + ", ".join(f"{k} {v[0]:.1f}/{v[1]:.1f}" for k, v in loads.items())
        )
    return "\n".join(lines)
