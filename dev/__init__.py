"""Developer harnesses of the solo_d2 repository, not part of the installed package.

* :mod:`dev.benchmark`: per-stage latency, throughput, training step, data loading and memory
  (``python -m dev.benchmark``; the cost of LVIS's class count:
  ``python -m dev.benchmark.lvis_classes``).
* :mod:`dev.parity`: this implementation's outputs against AdelaiDet's recorded ones
  (``python -m dev.parity FIXTURE.pt``).

Run them from the repository root, with solo_d2 installed (``make test`` / ``tools/setup_env.py``
install it editable).
"""
