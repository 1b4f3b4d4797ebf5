"""Start-up on COCO train2017- and LVIS v1-sized annotation files: reading, checking, registering,
loading, the evaluator's read and ``train_net.py`` until training starts, against detectron2.

    python -m dev.benchmark.startup [--kind coco lvis panoptic] [--scale 1.0] [--data-dir DIR]
        [--steps d2 json register loader evaluator train_net] [--repeat N] [--json OUT]

The files come from :func:`dev.benchmark.coco_scale.write_coco_like` (panoptic:
:func:`~dev.benchmark.coco_scale.write_panoptic_like`), written under
``DIR/<kind>`` (``DIR/<kind>_scale<S>`` below scale 1) unless already there. Every row runs in
its own fresh interpreter, which first imports torch, detectron2 and solo_d2 (timed apart, so
each row's wall time is its work alone; the import's resident memory is in every row's peak),
with ``SOLO_D2_CACHE`` set to a temporary folder of the run:

* ``d2``: detectron2's ``load_coco_json`` (LVIS: ``load_lvis_json``, which needs the ``lvis``
  package; the row says so when it is missing; panoptic: ``load_coco_panoptic_json``), the
  reference of the ratio column;
* ``json``: ``json.load`` of the file;
* ``register``: ``solo_d2.engine.cli.register_dataset(spec)`` with an empty cache folder (cold:
  read, check and pack), then again in a second process with the folder the first left (warm);
* ``loader``: registration and ``DatasetCatalog.get`` in one process, cold then warm;
* ``evaluator``: building ``SOLOCOCOEvaluator`` / ``SOLOLVISEvaluator`` for the dataset,
  registered first in the same process (warm cache; the row's time is the evaluator's alone);
* ``train_net``: ``train_net.py --num-gpus 2 ... MODEL.DEVICE cpu`` from its start until a line
  with "Starting training from iteration" appears (then its process group is ended), cold and
  warm, with the peak resident memory of each of its processes (VmHWM, sampled every 0.2 s).

With ``--repeat N`` every row runs N times, in turn with the others (each time with new cache
folders), and the table gives the median run and the range. Peak memory is each process's
VmHWM (Linux ``/proc``). Nothing is asserted about the times: the
rows are measured in the run that prints them, on the machine the report names.
"""

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["STEPS", "StartupSettings", "format_startup_table", "run_startup_benchmark"]

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/SOLOv2_R18_quickstart_shapes.yaml"
PANOPTIC_CONFIG = "configs/SOLOv2_R18_quickstart_panoptic_shapes.yaml"
DATASET = "big"  # the benchmark dataset's name in the catalog and on train_net's command line
READY_LINE = "Starting training from iteration"
# --steps choice -> the rows it measures, in the table's order
STEPS = {
    "d2": ["d2_load_json"],
    "json": ["json_load"],
    "register": ["register_cold", "register_warm"],
    "loader": ["loader_cold", "loader_warm"],
    "evaluator": ["evaluator"],
    "train_net": ["train_net_cold", "train_net_warm"],
}
# row -> the cache folder it uses: rows sharing one run in order, so the first is cold
_CACHE_OF_ROW = {
    "register_cold": "register",
    "register_warm": "register",
    "loader_cold": "loader",
    "loader_warm": "loader",
    "evaluator": "loader",
    "train_net_cold": "train_net",
    "train_net_warm": "train_net",
}


@dataclass
class StartupSettings:
    """What one benchmark run measures."""

    kind: str = "coco"  # "coco" or "lvis"
    scale: float = 1.0  # fraction of the real files' images and annotations
    data_dir: str = os.path.join("datasets", "benchmark_scale")
    steps: Sequence[str] = tuple(STEPS)  # keys of STEPS
    timeout: float = 3600.0  # seconds, per row
    repeats: int = 1  # runs of every row (each with new cache folders), the median reported


def dataset_files(kind: str, scale: float, data_dir: str) -> Dict[str, str]:
    """The annotation file and image folder of ``kind`` at ``scale`` under ``data_dir``, written
    by :func:`write_coco_like` unless the annotation file is already there."""
    sub = kind if scale == 1.0 else f"{kind}_scale{scale:g}"
    out = Path(data_dir) / sub
    json_file = out / f"{kind}_train_like.json"
    if json_file.is_file() and (out / "images").is_dir():
        paths = {"json_file": json_file, "image_root": out / "images"}
        if kind == "panoptic":
            paths["png_dir"] = out / "panoptic"
        return {k: str(Path(v).resolve()) for k, v in paths.items()}
    from dev.benchmark.coco_scale import write_coco_like, write_panoptic_like

    print(f"writing {kind}-sized files (scale {scale:g}) to {out} ...", flush=True)
    if kind == "panoptic":
        paths = write_panoptic_like(str(out), scale)
    else:
        paths = write_coco_like(str(out), kind, scale)
    return {k: str(Path(v).resolve()) for k, v in paths.items()}


def real_counts(kind: str) -> tuple:
    """(images, annotations, categories) of the real training file of ``kind`` (panoptic: one
    annotation per image, the thing categories)."""
    from dev.benchmark.coco_scale import COCO_TRAIN, LVIS_V1_TRAIN, PANOPTIC_TRAIN

    if kind == "panoptic":
        return PANOPTIC_TRAIN[0], PANOPTIC_TRAIN[0], PANOPTIC_TRAIN[1]
    return LVIS_V1_TRAIN if kind == "lvis" else COCO_TRAIN


def dataset_spec(kind: str, files: Dict[str, str]) -> str:
    """The ``--dataset`` spec registering ``files`` as :data:`DATASET`."""
    if kind == "panoptic":
        return f"{DATASET}=panoptic:{files['json_file']}:{files['png_dir']}:{files['image_root']}"
    prefix = "lvis:" if kind == "lvis" else ""
    return f"{DATASET}={prefix}{files['json_file']}:{files['image_root']}"


def _status_kb(field: str, pid: str = "self") -> Optional[int]:
    """A numeric field of ``/proc/<pid>/status`` (VmHWM, VmRSS in kB; PPid); None where
    unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


# ---------------------------------------------------------------------------------------------
# the rows measured in a child process: each returns {"wall_s": ..., details}


def _timed(fn: Callable[[], object]):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _d2_load_json(p: Dict) -> Dict:
    if p["kind"] == "lvis":
        try:
            import lvis  # noqa: F401  (load_lvis_json reads the file with it)
        except ImportError:
            return {"skipped": "the lvis package is not installed (pip install lvis)"}
        from detectron2.data.datasets.lvis import load_lvis_json as load

        name = "lvis_v1_benchmark"  # a "v1" name: detectron2 sets LVIS v1's class names
    elif p["kind"] == "panoptic":
        from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json

        def load_panoptic():
            with open(p["json_file"]) as f:  # the category maps detectron2's registration gives
                categories = json.load(f)["categories"]
            things = [c["id"] for c in categories if c["isthing"]]
            stuff = [c["id"] for c in categories if not c["isthing"]]
            meta = {
                "thing_dataset_id_to_contiguous_id": {c: i for i, c in enumerate(things)},
                "stuff_dataset_id_to_contiguous_id": {c: i for i, c in enumerate(stuff)},
            }
            return load_coco_panoptic_json(p["json_file"], p["image_root"], p["png_dir"], meta)

        dicts, wall = _timed(load_panoptic)
        return {"wall_s": wall, "images": len(dicts)}
    else:
        from detectron2.data.datasets import load_coco_json as load

        name = "coco_benchmark"
    dicts, wall = _timed(lambda: load(p["json_file"], p["image_root"], name))
    return {"wall_s": wall, "images": len(dicts)}


def _json_load(p: Dict) -> Dict:
    def read():
        with open(p["json_file"]) as f:
            return json.load(f)

    data, wall = _timed(read)
    return {"wall_s": wall, "images": len(data["images"])}


def _register(p: Dict) -> Dict:
    from solo_d2.engine.cli import register_dataset

    _, wall = _timed(lambda: register_dataset(p["spec"]))
    return {"wall_s": wall}


def _loader(p: Dict) -> Dict:
    from detectron2.data import DatasetCatalog

    from solo_d2.engine.cli import register_dataset

    name, register_s = _timed(lambda: register_dataset(p["spec"]))
    dicts, get_s = _timed(lambda: DatasetCatalog.get(name))
    return {
        "wall_s": register_s + get_s,
        "register_s": register_s,
        "get_s": get_s,
        "images": len(dicts),
    }


def _evaluator(p: Dict) -> Dict:
    from solo_d2.engine.cli import register_dataset
    from solo_d2.evaluation import SOLOCOCOEvaluator, SOLOLVISEvaluator

    if p["kind"] == "panoptic":
        return {"skipped": "measured for COCO and LVIS files"}
    name, register_s = _timed(lambda: register_dataset(p["spec"]))
    evaluator = SOLOLVISEvaluator if p["kind"] == "lvis" else SOLOCOCOEvaluator
    with tempfile.TemporaryDirectory(prefix="solo_startup_eval_") as out:
        _, wall = _timed(lambda: evaluator(name, output_dir=out, distributed=False))
    return {"wall_s": wall, "register_s": register_s}


_CHILD_ROWS = {
    "d2_load_json": _d2_load_json,
    "json_load": _json_load,
    "register_cold": _register,
    "register_warm": _register,
    "loader_cold": _loader,
    "loader_warm": _loader,
    "evaluator": _evaluator,
}


def run_child(row: str, params_json: str, out_json: str) -> None:
    """In a fresh process: import torch, detectron2 and solo_d2 (timed), measure ``row`` and write
    its results with this process's peak resident memory to ``out_json``."""
    start = time.perf_counter()
    import detectron2.data  # noqa: F401
    import torch  # noqa: F401

    import solo_d2.engine.cli  # noqa: F401
    import solo_d2.evaluation  # noqa: F401

    res = {"import_s": time.perf_counter() - start, "rss_after_import_kb": _status_kb("VmRSS")}
    res.update(_CHILD_ROWS[row](json.loads(params_json)))
    res["peak_rss_kb"] = {"main": [_status_kb("VmHWM")]}
    with open(out_json, "w") as f:
        json.dump(res, f)


def _output_tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _run_child_row(row: str, params: Dict, cache_dir: str, timeout: float) -> Dict:
    with tempfile.TemporaryDirectory(prefix="solo_startup_row_") as tmp:
        out = os.path.join(tmp, "row.json")
        # the script, not ``-m dev.benchmark.startup``: the package's other modules stay unimported
        cmd = [sys.executable, __file__, "--child", row, json.dumps(params), out]
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "SOLO_D2_CACHE": cache_dir, "PYTHONPATH": path}
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=timeout,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(
                f"startup row {row!r} failed (exit {proc.returncode}):\n{_output_tail(proc.stdout)}"
            )
        with open(out) as f:
            return json.load(f)


# ---------------------------------------------------------------------------------------------
# train_net.py until training starts


def _process_tree(root: int) -> List[int]:
    """``root`` and its descendants (from ``/proc/<pid>/stat``'s parent ids)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree.extend(frontier)
    return tree


def _sample_peaks(root: int, peaks: Dict[int, Dict]) -> None:
    """Raise ``peaks[pid]["peak_rss_kb"]`` to the current VmHWM of each process of ``root``'s
    tree, with its ``role``: "main" (``root``), "worker" (a child of ``root``: forked, or spawned
    by multiprocessing), "tracker" (multiprocessing's resource tracker) or "other"; and its
    command line."""
    for pid in _process_tree(root):
        hwm = _status_kb("VmHWM", str(pid))
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if hwm is None:
            continue
        if pid == root:
            role = "main"
        elif "resource_tracker" in cmd:
            role = "tracker"
        else:  # a child of a worker (a subprocess, a DataLoader worker) is "other"
            role = "worker" if _status_kb("PPid", str(pid)) == root else "other"
        old = peaks.get(pid, {}).get("peak_rss_kb", 0)
        peaks[pid] = {"pid": pid, "role": role, "cmd": cmd[:200], "peak_rss_kb": max(old, hwm)}


def train_net_command(kind: str, spec: str, output_dir: str) -> List[str]:
    """``train_net.py`` on 2 CPU processes, training on the benchmark dataset only."""
    num_classes = real_counts(kind)[2]
    config = PANOPTIC_CONFIG if kind == "panoptic" else CONFIG
    stuff = []
    if kind == "panoptic":
        from dev.benchmark.coco_scale import PANOPTIC_TRAIN

        stuff = ["MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES", str(PANOPTIC_TRAIN[2])]
    return [
        sys.executable, str(REPO / "train_net.py"), "--num-gpus", "2", "--dist-url", "auto",
        "--config-file", str(REPO / config), "--dataset", spec,
        "DATASETS.TRAIN", f"('{DATASET}',)", "DATASETS.TEST", "()",
        "MODEL.SOLO.NUM_CLASSES", str(num_classes), *stuff, "MODEL.DEVICE", "cpu",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", output_dir,
    ]  # fmt: skip


def _end_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _forward_lines(stream, lines: queue.Queue) -> None:
    """Put each line of ``stream`` on ``lines``, then None at its end."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def time_train_net(kind: str, spec: str, cache_dir: str, timeout: float) -> Dict:
    """Seconds from starting ``train_net.py`` until it logs :data:`READY_LINE`, and the peak
    resident memory (kB) of each of its processes by role ("main", "worker", "tracker")."""
    with tempfile.TemporaryDirectory(prefix="solo_startup_train_") as out:
        env = {**os.environ, "SOLO_D2_CACHE": cache_dir, "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        proc = subprocess.Popen(
            train_net_command(kind, spec, out), cwd=REPO, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=_forward_lines, args=(proc.stdout, lines), daemon=True).start()
        output, peaks, wall = [], {}, None
        try:
            while wall is None:
                _sample_peaks(proc.pid, peaks)
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    if time.perf_counter() - start > timeout:
                        raise RuntimeError(
                            f"train_net.py did not start training in {timeout:g} s"
                        ) from None
                    continue
                if line is None:
                    raise RuntimeError(
                        f"train_net.py ended (exit {proc.wait()}) before training started:\n"
                        + _output_tail("".join(output))
                    )
                output.append(line)
                if READY_LINE in line:
                    wall = time.perf_counter() - start
                    _sample_peaks(proc.pid, peaks)
        finally:
            _end_group(proc)
    by_role: Dict[str, list] = {}
    for pid in sorted(peaks):
        by_role.setdefault(peaks[pid]["role"], []).append(peaks[pid]["peak_rss_kb"])
    return {"wall_s": wall, "peak_rss_kb": by_role, "processes": [peaks[p] for p in sorted(peaks)]}


# ---------------------------------------------------------------------------------------------
# the run and its table


def run_startup_benchmark(s: StartupSettings) -> Dict:
    """Measure the rows of ``s.steps`` for ``s.kind``; returns {"kind", "scale", "files",
    "json_mb", "images", "annotations", "rows": {row: results}} (results as
    :func:`run_child` writes them, or {"skipped": reason})."""
    unknown = sorted(set(s.steps) - set(STEPS))
    if unknown:
        raise ValueError(f"unknown step(s) {unknown}; choose from {list(STEPS)}")
    files = dataset_files(s.kind, s.scale, s.data_dir)
    spec = dataset_spec(s.kind, files)
    params = {"kind": s.kind, "spec": spec, **files}
    counts = real_counts(s.kind)
    report = {
        "kind": s.kind,
        "scale": s.scale,
        "files": files,
        "json_mb": round(os.path.getsize(files["json_file"]) / 1e6, 1),
        "images": max(1, round(counts[0] * s.scale)),
        "annotations": max(1, round(counts[1] * s.scale)),
        "rows": {},
    }
    rows = [row for step in STEPS if step in s.steps for row in STEPS[step]]
    runs: Dict[str, List[Dict]] = {row: [] for row in rows}
    for run in range(s.repeats):  # every row in turn, so that the rows share the machine's moods
        with tempfile.TemporaryDirectory(prefix="solo_startup_cache_") as caches:
            for row in rows:
                cache_dir = os.path.join(caches, _CACHE_OF_ROW.get(row, "unused"))
                os.makedirs(cache_dir, exist_ok=True)
                load = os.getloadavg()[0]
                if row.startswith("train_net"):
                    res = time_train_net(s.kind, spec, cache_dir, s.timeout)
                else:
                    res = _run_child_row(row, params, cache_dir, s.timeout)
                res["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]
                runs[row].append(res)
                label = f" (run {run + 1} of {s.repeats})" if s.repeats > 1 else ""
                print(f"[{s.kind}] {row}{label}: {_fmt_row(res)}", flush=True)
    report["rows"] = {row: median_run(results) for row, results in runs.items()}
    return report


def median_run(results: List[Dict]) -> Dict:
    """The run of median wall time (the lower middle one of an even count), with every run's
    wall time under "runs_s"; a skipped row as it is."""
    if any("skipped" in res for res in results):
        return results[0]
    ordered = sorted(results, key=lambda res: res["wall_s"])
    return {**ordered[(len(ordered) - 1) // 2], "runs_s": [res["wall_s"] for res in results]}


_LABELS = {
    "d2_load_json": "detectron2 load_coco_json",
    "json_load": "json.load (reference)",
    "register_cold": "solo_d2 register_dataset, cold cache",
    "register_warm": "solo_d2 register_dataset, warm cache",
    "loader_cold": "register + DatasetCatalog.get, cold",
    "loader_warm": "register + DatasetCatalog.get, warm",
    "evaluator": "evaluator built (registered, warm)",
    "train_net_cold": "train_net 2 CPU procs to 1st iter, cold",
    "train_net_warm": "train_net 2 CPU procs to 1st iter, warm",
}


def _fmt_rss(peaks: Dict[str, list]) -> str:
    gb = {role: ", ".join(f"{kb / 2**20:.2f}" for kb in kbs) for role, kbs in peaks.items()}
    if list(gb) == ["main"]:
        return gb["main"]
    return "; ".join(f"{role} {gb[role]}" for role in ("main", "worker") if role in gb)


def _fmt_row(res: Dict) -> str:
    if "skipped" in res:
        return f"skipped: {res['skipped']}"
    return f"{res['wall_s']:.2f} s, peak RSS {_fmt_rss(res['peak_rss_kb'])} GB"


def format_startup_table(report: Dict, machine: Dict) -> str:
    """The markdown table of one :func:`run_startup_benchmark` report, under a line naming the
    files and one describing ``machine`` (:func:`dev.benchmark.machine_info`)."""
    rows = report["rows"]
    d2 = rows.get("d2_load_json", {}).get("wall_s")
    imports = [r["import_s"] for r in rows.values() if "import_s" in r]
    runs = max((len(r.get("runs_s", ())) for r in rows.values()), default=1)
    label_d2 = {"lvis": "load_lvis_json", "panoptic": "load_coco_panoptic_json"}.get(
        report["kind"], "load_coco_json"
    )
    lines = [
        f"{report['kind']}-sized file (scale {report['scale']:g}): {report['json_mb']:g} MB, "
        f"{report['images']:,} images, {report['annotations']:,} annotations"
        + (f"; medians of {runs} runs (range)" if runs > 1 else ""),
        f"machine: {machine['cpu']}, {machine['cpu_cores']} cores "
        f"({machine['cpu_cores_usable']} usable), torch {machine['torch']} with "
        f"{machine['torch_threads']} threads, load average {machine['load_average']}",
        "",
        f"| step | wall s | x {label_d2} | peak RSS GB |",
        "|---|---:|---:|---|",
    ]
    for row, res in rows.items():
        label = _LABELS[row].replace("load_coco_json", label_d2)
        if "skipped" in res:
            lines.append(f"| {label} | skipped: {res['skipped']} | | |")
            continue
        ratio = f"{res['wall_s'] / d2:.2f}" if d2 else "-"
        rss = _fmt_rss(res["peak_rss_kb"])
        wall = f"{res['wall_s']:.2f}"
        if len(res.get("runs_s", ())) > 1:
            wall += f" ({min(res['runs_s']):.2f}-{max(res['runs_s']):.2f})"
        lines.append(f"| {label} | {wall} | {ratio} | {rss} |")
    if imports:
        lines.append("")
        lines.append(
            f"Each in-process row ran in a fresh interpreter after importing torch, detectron2 "
            f"and solo_d2 ({min(imports):.1f}-{max(imports):.1f} s, not counted in wall s; "
            f"their memory is in the peak). train_net rows: from the command's start (imports "
            f'included) until rank 0 logs "{READY_LINE}".'
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:  # one row, in the fresh process _run_child_row starts
        run_child(*argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", nargs="+", choices=["coco", "lvis", "panoptic"], default=["coco"])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real counts")
    parser.add_argument("--data-dir", default=os.path.join("datasets", "benchmark_scale"))
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per row")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every row (medians)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error(f"--scale must be positive, got {args.scale}")
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    import torch

    from dev.benchmark.timing import machine_info

    reports = []
    for kind in args.kind:
        settings = StartupSettings(
            kind, args.scale, args.data_dir, args.steps, args.timeout, args.repeat
        )
        reports.append(run_startup_benchmark(settings))
    machine = machine_info(torch.device("cpu"))
    print("\n\n".join(format_startup_table(r, machine) for r in reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "reports": reports}, f, indent=1)


if __name__ == "__main__":
    main()
