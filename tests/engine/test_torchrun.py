"""train_net.py started by torchrun: the ranks from torchrun's variables, one training of world
size 2 (not two of world size 1), the preflight's one error line, preemption and --resume.

torchrun runs in its module form, ``python -m torch.distributed.run``, with 2 CPU processes.
"""

import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import test_preemption
import torch
from conftest import REPO
from detectron2.engine import default_argument_parser
from detectron2.utils import comm
from test_preemption import ENV, STOPPED, check_stopped, train_net_command

from solo_d2.engine import TrainingPreempted
from solo_d2.engine.launch import TorchrunEnv, check_torchrun_arguments, torchrun_env

solo_launch = importlib.import_module("solo_d2.engine.launch")  # the module, not the function

launch = importlib.import_module("solo_d2.engine.launch")  # solo_d2.engine.launch: the function
small_train = test_preemption.small_train  # the fixture: a small training set

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]

# what torchrun sets for the second process of the first of two machines of 2 processes each
SECOND_OF_FOUR = {
    "RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "node0", "MASTER_PORT": "29500",
}  # fmt: skip


def test_torchrun_env_reads_the_ranks():
    env = torchrun_env(SECOND_OF_FOUR)
    assert env == TorchrunEnv(rank=1, world_size=4, local_rank=1, local_world_size=2)
    assert (env.num_machines, env.machine_rank) == (2, 0)
    assert torchrun_env({**SECOND_OF_FOUR, "RANK": "3"}).machine_rank == 1
    assert torchrun_env({"MASTER_ADDR": "node0", "MASTER_PORT": "29500", "HOME": "/"}) is None


@pytest.mark.parametrize(
    "changes, phrase",
    [
        ({"LOCAL_RANK": None, "LOCAL_WORLD_SIZE": None}, "LOCAL_RANK, LOCAL_WORLD_SIZE not set"),
        ({"MASTER_PORT": ""}, "MASTER_PORT not set"),
        ({"WORLD_SIZE": "four"}, "WORLD_SIZE='four' is not an integer"),
        ({"RANK": "4"}, "a rank outside its world"),
        ({"RANK": "2"}, "the same number of processes"),  # LOCAL_RANK 1 is rank 1 or 3
        ({"WORLD_SIZE": "3", "RANK": "1"}, "the same number of processes"),
    ],
    ids=["pytorchjob without torchrun", "empty", "not a number", "outside", "order", "uneven"],
)
def test_torchrun_env_refuses_incomplete_or_inconsistent_variables(changes, phrase):
    environ = {k: v for k, v in {**SECOND_OF_FOUR, **changes}.items() if v is not None}
    with pytest.raises(ValueError, match=re.escape(phrase)):
        torchrun_env(environ)


def test_launch_arguments_under_torchrun():
    parser = default_argument_parser()
    env = torchrun_env(SECOND_OF_FOUR)
    args = parser.parse_args([])  # detectron2's defaults: from torchrun's variables
    check_torchrun_arguments(env, args, parser)
    assert (args.num_gpus, args.num_machines, args.machine_rank) == (2, 2, 0)
    assert args.dist_url == "env://"
    args = parser.parse_args(["--num-gpus", "2", "--num-machines", "2"])  # agreeing: accepted
    check_torchrun_arguments(env, args, parser)

    args = parser.parse_args(["--num-gpus", "8", "--dist-url", "tcp://node0:1234"])
    with pytest.raises(ValueError) as e:
        check_torchrun_arguments(env, args, parser)
    message = str(e.value)
    assert "--num-gpus 8 (torchrun: LOCAL_WORLD_SIZE = 2)" in message
    assert "--dist-url tcp://node0:1234 (torchrun: MASTER_ADDR:MASTER_PORT = env://)" in message
    assert "--num-machines" not in message.split(":")[0] and len(message.splitlines()) == 1


def test_the_preflight_of_each_machine_decides_for_all(monkeypatch):
    """Machine 1's ranks get its local rank 0's completed arguments, or, when another machine's
    preflight failed, its message (reported by local rank 0 only)."""
    env = torchrun_env({**SECOND_OF_FOUR, "RANK": "3"})  # machine 1, local rank 1
    ok = [(None, ("args of machine 0",)), None, (None, ("args of machine 1",)), None]
    monkeypatch.setattr(comm, "all_gather", lambda outcome: ok)
    assert launch._preflight_on_local_rank_0(None, ("mine",), env) == ("args of machine 1",)

    failed = [("dataset x is missing", ()), None, (None, ()), None]
    monkeypatch.setattr(comm, "all_gather", lambda outcome: failed)
    for rank, report in [("3", False), ("2", True)]:
        env = torchrun_env({**SECOND_OF_FOUR, "RANK": rank, "LOCAL_RANK": str(int(rank) - 2)})
        with pytest.raises(launch.PreflightFailed) as e:
            launch._preflight_on_local_rank_0(lambda *args: None, (), env)
        assert e.value.message == "dataset x is missing (on machine rank 0)"
        assert e.value.report == report

    def crash(*args):
        raise KeyError("bug")

    sent = []
    monkeypatch.setattr(comm, "all_gather", lambda outcome: sent.append(outcome) or failed)
    with pytest.raises(KeyError):  # on machine 0's local rank 0: the exception itself
        launch._preflight_on_local_rank_0(
            crash, (), torchrun_env({**SECOND_OF_FOUR, "RANK": "0", "LOCAL_RANK": "0"})
        )
    assert sent == [("preflight failed: KeyError: 'bug'", ())]  # the others stop with it


def run_train_net(command, tmp_path, env=ENV, timeout=600):
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_contradicting_arguments_end_the_run_with_one_line(tmp_path):
    """As a process of a torchrun of 2 (the variables set by hand): before any work."""
    config = REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml"
    command = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(config)]
    variables = {**SECOND_OF_FOUR, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    res = run_train_net(command + ["--num-gpus", "8"], tmp_path, env={**ENV, **variables})
    assert res.returncode == 2
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("train_net.py: error: started by torchrun") and "--num-gpus 8" in line
    assert not res.stdout and not list(tmp_path.iterdir())


LAUNCH_FROM_ENV = """
import os, signal, sys, time
from solo_d2.engine.launch import PreflightFailed, launch_from_env

def main(arguments):
    print("main", arguments, flush=True)
    if "signal" in arguments:  # before training: no PreemptionHook
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)

def preflight(arguments):
    arguments.append("completed")
    return "the config is wrong" if "fail" in arguments else None

try:
    launch_from_env(main, (sys.argv[1:],), preflight=preflight, device="cpu")
except PreflightFailed as e:
    print("failed:", e.message, e.report)
    sys.exit(2)
"""


@pytest.mark.parametrize(
    "argument, status, output",
    [
        ("ok", 0, "main ['ok', 'completed']"),
        ("fail", 2, "failed: the config is wrong True"),
        ("signal", 75, "main ['signal', 'completed']"),
    ],
)
def test_launch_from_env_in_one_process(tmp_path, argument, status, output):
    """launch_from_env as the only process of a torchrun: the preflight's completed arguments
    reach main_func, or its message is raised; a SIGTERM outside training ends it with 75."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    variables = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    command = [sys.executable, "-c", LAUNCH_FROM_ENV, argument]
    res = run_train_net(command, tmp_path, env={**ENV, **variables}, timeout=120)
    assert res.returncode == status, res.stderr[-3000:]
    assert res.stdout.splitlines()[0] == output
    if argument == "signal":
        assert "SIGTERM received outside training: exiting with status 75" in res.stderr


@pytest.mark.parametrize("outcome", ["return", "preempted", "error"])
def test_a_spawned_worker_closes_its_process_groups_after_main(tmp_path, outcome):
    """launch's workers destroy and release their process groups when main returns or the training
    is preempted (not freed at interpreter shutdown, where Gloo can abort the process); after
    another error they are left alone (a destroy could wait for ranks still in a collective)."""
    import torch.distributed as dist

    def main(value):
        assert dist.is_initialized() and comm.get_local_size() == 1
        if outcome == "preempted":
            raise TrainingPreempted()
        if outcome == "error":
            raise ValueError(value)
        return value

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", world_size=1, rank=0
    )
    try:
        comm.create_local_process_group(1)
        if outcome == "return":
            assert solo_launch._worker_main(main, None, 42) == 42
        else:
            with pytest.raises((TrainingPreempted, ValueError)):
                solo_launch._worker_main(main, None, 42)
        assert dist.is_initialized() == (outcome == "error")
        assert (comm._LOCAL_PROCESS_GROUP is None) == (outcome != "error")
    finally:
        solo_launch._close_process_groups()


def torchrun_command(small_train, out, opts, *flags):
    """train_net.py on 2 CPU processes under torchrun (see test_preemption.train_net_command)."""
    command = train_net_command(small_train, out, ["MODEL.DEVICE", "cpu", *opts], *flags)
    return TORCHRUN + command[1:]


def exit_statuses(torchrun_stderr: str):
    """The workers' exit statuses in torchrun's failure summary."""
    return [int(s) for s in re.findall(r"^\s+exitcode\s+:\s+(-?\d+)", torchrun_stderr, re.M)]


def test_preflight_error_under_torchrun(small_train, tmp_path):
    """The preflight runs once (local rank 0), every rank exits 2, one error line."""
    out = tmp_path / "out"
    res = run_train_net(
        torchrun_command(small_train, out, ["MODEL.SOLO.NUM_CLASSES", "80"]), tmp_path
    )
    assert res.returncode != 0  # torchrun's own status when a worker fails
    [line] = [line for line in res.stderr.splitlines() if "train_net.py: error" in line]
    assert line.startswith("train_net.py: error: MODEL.SOLO.NUM_CLASSES is 80")
    assert sorted(exit_statuses(res.stderr)) == [2, 2], res.stderr[-6000:]
    assert res.stdout.count("Command Line Args") == 1
    assert not out.exists()


@pytest.mark.e2e
def test_one_training_of_world_size_2(small_train, tmp_path):
    out = tmp_path / "out"
    res = run_train_net(torchrun_command(small_train, out, ["SOLVER.MAX_ITER", "4",
                                                            "SOLVER.CHECKPOINT_PERIOD", "2"]),
                        tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log0, log1 = (out / "log.txt").read_text(), (out / "log.txt.rank1").read_text()
    assert "Rank of current process: 0. World size: 2" in log0
    assert "Rank of current process: 1. World size: 2" in log1
    # both ranks map the dataset the preflight's registration packed (solo_d2.data.packed)
    assert "mapped from packed datasets" in log0 and "mapped from packed datasets" in log1
    assert res.stdout.count("Starting training from iteration 0") == 1
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [3]  # one writer: not twice
    saved = re.findall(r"Saving checkpoint to (\S+)", log0)
    names = ["model_0000001.pth", "model_0000003.pth", "model_final.pth"]  # each once
    assert [os.path.basename(p) for p in saved] == names
    assert "Saving checkpoint" not in log1
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 3
    # rank 1 writes its log only
    assert {p.name for p in out.iterdir() if "rank1" in p.name} == {"log.txt.rank1"}


def worker_pids(pid: int):
    """The processes torchrun ``pid`` started."""
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return children


@pytest.mark.e2e
@pytest.mark.parametrize(
    "signum, to_workers", [(signal.SIGUSR1, True), (signal.SIGTERM, False)],
    ids=["workers", "torchrun"],
)  # fmt: skip
def test_preemption_under_torchrun_then_resume(small_train, tmp_path, signum, to_workers):
    """SIGUSR1 to each worker (SLURM signals every process of a step), or SIGTERM to torchrun
    (Kubernetes signals the container's first process; torchrun forwards it): both ranks stop
    after the same iteration, rank 0 writes the checkpoint, each exits 75; --resume continues."""
    out = tmp_path / "out"
    stderr_path = tmp_path / "torchrun.err"
    with open(tmp_path / "torchrun.out", "w") as stdout, open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            torchrun_command(small_train, out, ["SOLVER.MAX_ITER", "1000"]),
            cwd=tmp_path, env=ENV, stdout=stdout, stderr=stderr, start_new_session=True,
        )  # fmt: skip
    metrics = out / "metrics.json"
    while not (metrics.exists() and '"iteration": 19' in metrics.read_text()):
        assert proc.poll() is None, stderr_path.read_text()[-3000:]
        time.sleep(0.05)
    for pid in worker_pids(proc.pid) if to_workers else [proc.pid]:
        os.kill(pid, signum)
    assert proc.wait(timeout=120) != 0  # torchrun's status after a worker exits 75
    log0 = (out / "log.txt").read_text()
    stopped = check_stopped(log0, "", out, signum)
    [line] = [
        line for line in (out / "log.txt.rank1").read_text().splitlines() if "Stopped" in line
    ]
    assert STOPPED.search(line).group(2) == str(stopped)
    assert log0.count("Saving checkpoint") == 1
    torchrun_stderr = stderr_path.read_text()
    assert "SIGKILL" not in torchrun_stderr  # the workers stopped in time by themselves
    if to_workers:  # then torchrun's summary lists them (signalled itself, it does not)
        assert exit_statuses(torchrun_stderr) == [75, 75]

    command = torchrun_command(small_train, out, ["SOLVER.MAX_ITER", str(stopped + 3)], "--resume")
    res = run_train_net(command, tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count(f"Starting training from iteration {stopped + 1}") == 1
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == stopped + 2
