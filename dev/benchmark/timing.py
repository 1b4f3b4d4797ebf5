"""Timing and memory measurement, and a description of the machine they ran on.

Times are wall-clock medians over repeated runs (CUDA synchronised around each), with the
process's CPU time per run beside them (all its threads together: less sensitive than wall time
to other load on the machine). Peak memory is the increase over the level at the start of a
measurement: on CUDA ``torch.cuda.max_memory_allocated``; on Linux the resident-set high-water mark
(VmHWM, reset through ``/proc/self/clear_refs``); elsewhere the ``ru_maxrss`` increase (a lower
bound).
"""

import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch

__all__ = ["PeakMemory", "machine_info", "measure", "summarize", "synchronize", "time_fn"]


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times: Sequence[float], cpu_times: Optional[Sequence[float]] = None) -> Dict:
    """Median, min, max and every wall-clock time of a list of seconds, and the median CPU
    seconds per run when ``cpu_times`` are given."""
    out = {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
        "times_s": [round(t, 6) for t in times],
    }
    if cpu_times:
        out["cpu_median_s"] = statistics.median(cpu_times)
    return out


def time_fn(fn: Callable[[], object], *, repeats: int, warmup: int, device: torch.device) -> Dict:
    """Run ``fn`` ``warmup`` times, then time ``repeats`` runs (:func:`summarize` of them)."""
    for _ in range(warmup):
        fn()
    times, cpu_times = [], []
    for _ in range(repeats):
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return summarize(times, cpu_times)


def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kb("VmHWM") is not None


class PeakMemory:
    """Peak memory of the code in a ``with`` block, above the level at its start.

    ``method`` says how it was measured: "cuda_max_memory_allocated" (tensors on the GPU),
    "VmHWM" (resident set of the whole process, exact high-water mark) or "ru_maxrss" (the
    increase of the process's lifetime peak: a lower bound, 0 when an earlier peak was higher).
    On the CPU it counts new resident pages: memory the allocator hands back from earlier frees
    of the process is already resident and does not count.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: Optional[int] = None
        self.method = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda_max_memory_allocated"
            self._base = torch.cuda.memory_allocated(self.device)
        elif _reset_rss_peak():
            self.method = "VmHWM"
            self._base = _proc_status_kb("VmRSS") * 1024
        else:
            self.method = "ru_maxrss"
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc) -> bool:
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "VmHWM":
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_bytes = max(0, peak - self._base)
        return False

    def as_dict(self) -> Dict:
        return {"peak_mem_mb": round(self.peak_bytes / 2**20, 1), "mem_method": self.method}


def measure(fn: Callable[[], object], *, repeats: int, warmup: int, device: torch.device) -> Dict:
    """:func:`time_fn` plus the :class:`PeakMemory` of the warm-up and timed runs."""
    with PeakMemory(device) as mem:
        result = time_fn(fn, repeats=repeats, warmup=warmup, device=device)
    return {**result, **mem.as_dict()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    """The short commit of the checkout this package runs from, if it is one."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info(device: torch.device) -> Dict:
    """CPU, cores, threads, software versions, load and (on CUDA) the GPU of this run."""
    info = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        ),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info
