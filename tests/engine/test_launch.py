"""How :func:`solo_d2.engine.launch` starts CPU workers: forked from the launching process, which
ran torch on one thread until then (:func:`~solo_d2.engine.launch.prepare_forked_workers`)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from solo_d2.engine.launch import launch

FORKED_WORKERS = """
import json, os, sys
import torch
from detectron2.utils import comm
from solo_d2.engine.launch import launch, prepare_forked_workers

STARTED = []  # set by the launching process after its imports: a spawned worker has it empty

def main(out):
    a = torch.randn(256, 256)
    for _ in range(20):  # multi-threaded ops: they hang if the launcher had started OpenMP's team
        a = torch.tanh(a @ a)
        torch.nn.functional.conv2d(torch.randn(1, 16, 64, 64), torch.randn(16, 16, 3, 3))
    with open(os.path.join(out, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump({"threads": torch.get_num_threads(), "started": STARTED,
                   "parent": os.getppid(), "world": comm.get_world_size()}, f)

if __name__ == "__main__":
    threads = prepare_forked_workers()
    x = torch.randn(256, 256)
    (x @ x).sum()  # the launcher's own torch ops, on one thread (as a preflight's would be)
    assert torch.get_num_threads() == 1
    STARTED.append(os.getpid())
    launch(main, 2, dist_url="auto", args=(sys.argv[1],), fork_threads=threads)
"""


def test_cpu_workers_are_forked_with_their_threads_back(tmp_path):
    script = tmp_path / "forked.py"
    script.write_text(FORKED_WORKERS)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True,
            text=True, timeout=240,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the forked workers hung (OpenMP threads of the launcher?)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    launcher = {rank["parent"] for rank in ranks}
    assert len(launcher) == 1  # both children of the launching process
    for rank in ranks:
        assert rank["started"] == list(launcher)  # its state after start-up: a fork
        assert rank["threads"] == 2  # OMP_NUM_THREADS, given back after the fork
        assert rank["world"] == 2


def test_forking_refuses_a_launcher_on_several_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="prepare_forked_workers"):
            launch(print, 2, dist_url="auto", fork_threads=2)
    finally:
        torch.set_num_threads(before)


def test_one_process_runs_in_place_whatever_the_start_method():
    assert launch(lambda x: x + 1, 1, args=(41,), fork_threads=4) == 42
