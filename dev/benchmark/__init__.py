"""Benchmarks of solo_d2: per-stage latency, throughput, training step, data loading, memory.

:mod:`.timing` measures (medians, CPU time, peak memory) and describes the machine,
:mod:`.inputs` makes deterministic synthetic inputs, :mod:`.stages` runs the stages
(``python -m dev.benchmark`` is their command line, :mod:`.__main__`) and :mod:`.report` formats
the results. Every figure is measured in the run that prints it.
"""

from .report import format_report
from .stages import STAGES, BenchmarkSettings, run_stage, run_stage_isolated
from .timing import PeakMemory, machine_info, measure, time_fn

__all__ = [
    "STAGES",
    "BenchmarkSettings",
    "PeakMemory",
    "format_report",
    "machine_info",
    "measure",
    "run_stage",
    "run_stage_isolated",
    "time_fn",
]
