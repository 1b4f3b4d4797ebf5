"""One benchmark stage in a fresh process, what :func:`~dev.benchmark.stages.run_stage_isolated`
runs from the repository root::

    python -m dev.benchmark.child STAGE SETTINGS_JSON OUT_JSON

``SETTINGS_JSON`` holds the :class:`~dev.benchmark.stages.BenchmarkSettings` fields; the stage's
results are written to ``OUT_JSON``.
"""

import sys

from .stages import run_stage_in_child

if __name__ == "__main__":
    run_stage_in_child(*sys.argv[1:])
