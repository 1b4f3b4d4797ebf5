"""Preemption: SIGTERM or SIGUSR1 stops training after the current iteration with a checkpoint of
that iteration and exit status 75; ``--resume`` continues at the next iteration.

train_net.py runs in a subprocess of its own session, which a test signals as a scheduler does:
every process of the group (DataLoader workers included), or the launching process only.
"""

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, TINY_OPTS, tiny_cfg
from detectron2.engine import HookBase
from torch.utils.data import DataLoader, Dataset

from solo_d2.data.coco import register_coco_dataset
from solo_d2.data.shapes import generate_shapes
from solo_d2.engine import PREEMPTED_EXIT_STATUS, Trainer, TrainingPreempted
from solo_d2.engine.hooks import leave_signals_to_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml"
STOPPED = re.compile(
    r"Stopped by (SIG\w+) after iteration (\d+): checkpoint (\S+) written; exiting with status 75"
)


@pytest.fixture(scope="module")
def small_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    ann = generate_shapes(str(root), "train", 8, seed=13, min_size=64, max_size=96)
    return f"preemption_train={ann}:{root / 'train'}"


class SignalAt(HookBase):
    """Sends ``signum`` to this process at the start of iteration ``iteration``."""

    def __init__(self, iteration: int, signum: int):
        self.iteration, self.signum = iteration, signum

    def before_step(self):
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), self.signum)


def tiny_trainer(small_train, out, max_iter: int) -> Trainer:
    cfg = tiny_cfg()
    cfg.merge_from_list(
        ["MODEL.SOLO.NUM_CLASSES", 4, "DATASETS.TRAIN", (register_coco_dataset(small_train),),
         "DATASETS.TEST", (), "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 96,
         "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", max_iter, "SOLVER.CHECKPOINT_PERIOD", 100,
         "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(out)]
    )  # fmt: skip
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def test_sigusr1_stops_after_the_iteration_with_its_checkpoint(small_train, tmp_path):
    previous = signal.getsignal(signal.SIGUSR1)
    trainer = tiny_trainer(small_train, tmp_path, max_iter=10)
    trainer.register_hooks([SignalAt(3, signal.SIGUSR1)])
    with pytest.raises(TrainingPreempted) as e:
        trainer.train()
    assert e.value.code == PREEMPTED_EXIT_STATUS == 75
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (tmp_path / "model_final.pth").exists()
    ckpt = torch.load(tmp_path / "model_0000003.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == ckpt["trainer"]["iteration"] == 3
    assert ckpt["trainer"]["_trainer"]["optimizer"]["state"]
    [scheduler] = [h for h in ckpt["trainer"]["hooks"].values() if "last_epoch" in h]
    assert scheduler["last_epoch"] == 4  # 4 iterations done: 0 to 3
    assert signal.getsignal(signal.SIGUSR1) == previous  # restored after training


def test_a_signal_during_the_last_iteration_lets_training_complete(small_train, tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    trainer = tiny_trainer(small_train, tmp_path, max_iter=3)
    trainer.register_hooks([SignalAt(2, signal.SIGTERM)])
    trainer.train()
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_final.pth"]
    assert signal.getsignal(signal.SIGTERM) == previous


class WorkerPids(Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, index):
        return os.getpid()


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_data_loader_workers_leave_signals_to_the_trainer(start_method):
    """A worker ignores SIGTERM and SIGUSR1 from another process (a scheduler signalling every
    process), but ends, with status 0, on a SIGTERM from its parent (the loader shutting down).
    Workers are forked, also where spawn is the default (the processes of detectron2's launch)."""
    loader = DataLoader(
        WorkerPids(), num_workers=1, multiprocessing_context=start_method, prefetch_factor=1
    )
    batches = iter(leave_signals_to_trainer(loader))
    pid = int(next(batches))
    for signum in (signal.SIGTERM, signal.SIGUSR1):  # sent by another process than the parent
        subprocess.run([sys.executable, "-c", f"import os; os.kill({pid}, {signum})"], check=True)
    for _ in range(5):
        assert int(next(batches)) == pid
    [worker] = [p for p in multiprocessing.active_children() if p.pid == pid]
    os.kill(pid, signal.SIGTERM)
    worker.join()
    assert worker.exitcode == 0
    del batches


# ---- train_net.py, signalled as a cluster does ---------------------------------------------------
def train_net_command(small_train, out, opts, *flags):
    """train_net.py with ``flags`` on the tiny model, with a long checkpoint period and a
    DataLoader worker, and the config overrides ``opts``."""
    opts = TINY_OPTS + [
        "DATASETS.TRAIN", "('preemption_train',)", "DATASETS.TEST", "()",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "DATALOADER.NUM_WORKERS", "1", "OUTPUT_DIR", str(out),
    ] + opts  # fmt: skip
    command = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(CONFIG)]
    return command + ["--dataset", small_train, *flags, *opts]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # no oversubscribed threads on a busy machine


def train_until_signalled(tmp_path, command, signum, whole_group=True):
    """Run ``command`` in a session of its own; once metrics.json has iteration 19, send
    ``signum`` to every process of the session, or to the first only. Returns its stdout and
    stderr, after checking that it exited with status 75 within 60 s."""
    stdout, stderr = tmp_path / "stopped.out", tmp_path / "stopped.err"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=out, stderr=err,
                                start_new_session=True)  # fmt: skip
    metrics = tmp_path / "out" / "metrics.json"
    while not (metrics.exists() and '"iteration": 19' in metrics.read_text()):
        assert proc.poll() is None, stdout.read_text()[-3000:] + stderr.read_text()[-3000:]
        time.sleep(0.05)
    if whole_group:
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    assert proc.wait(timeout=60) == PREEMPTED_EXIT_STATUS, stderr.read_text()[-3000:]
    return stdout.read_text(), stderr.read_text()


def check_stopped(stdout, stderr, out, signum):
    """The one "Stopped by" line; the checkpoint it names. Returns the iteration."""
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    [line] = [line for line in stdout.splitlines() if "Stopped by" in line]
    name, iteration, path = STOPPED.search(line).groups()
    assert name == signal.Signals(signum).name
    iteration = int(iteration)
    assert iteration >= 20  # the signal came after iteration 19, mid-training
    checkpoint = f"model_{iteration:07d}.pth"
    assert path == str(out / checkpoint)
    assert (out / "last_checkpoint").read_text() == checkpoint
    assert not (out / "model_final.pth").exists()
    ckpt = torch.load(out / checkpoint, map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == iteration
    [scheduler] = [h for h in ckpt["trainer"]["hooks"].values() if "last_epoch" in h]
    assert scheduler["last_epoch"] == iteration + 1
    return iteration


def test_sigterm_to_the_process_group_then_resume(small_train, tmp_path):
    out = tmp_path / "out"
    command = train_net_command(small_train, out, ["SOLVER.MAX_ITER", "1000"])  # stopped before
    stdout, stderr = train_until_signalled(tmp_path, command, signal.SIGTERM)
    stopped = check_stopped(stdout, stderr, out, signal.SIGTERM)

    res = subprocess.run(
        train_net_command(small_train, out, ["SOLVER.MAX_ITER", str(stopped + 3)], "--resume"),
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"Starting training from iteration {stopped + 1}" in res.stdout
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    iterations = [r["iteration"] for r in records]
    assert iterations[0] == 19 and iterations[-2:] == [stopped, stopped + 2]
    assert iterations == sorted(set(iterations))
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == stopped + 2


@pytest.mark.e2e
@pytest.mark.parametrize(
    "signum, whole_group",
    [(signal.SIGTERM, True), (signal.SIGUSR1, False)],
    ids=["group", "parent"],
)
def test_two_processes_stop_after_the_same_iteration(small_train, tmp_path, signum, whole_group):
    """--num-gpus 2 on CPU: the signal reaches every process, or only the launching process,
    which forwards it; both ranks stop after the same iteration, rank 0 writes the checkpoint."""
    out = tmp_path / "out"
    opts = ["SOLVER.MAX_ITER", "1000", "MODEL.DEVICE", "cpu"]
    command = train_net_command(small_train, out, opts, "--num-gpus", "2")
    stdout, stderr = train_until_signalled(tmp_path, command, signum, whole_group)
    stopped = check_stopped(stdout, stderr, out, signum)
    [line] = [
        line for line in (out / "log.txt.rank1").read_text().splitlines() if "Stopped" in line
    ]
    assert STOPPED.search(line).group(2) == str(stopped)
