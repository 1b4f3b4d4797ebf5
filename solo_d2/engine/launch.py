"""Starting the processes of a training that a preemption signal may stop (see :mod:`.hooks`):
detectron2's ``launch`` (:func:`launch`: this process spawns one per GPU, or forks one per CPU
process), or torchrun (:func:`launch_from_env`: torchrun started them, its variables give the
ranks)."""

import ctypes
import functools
import gc
import logging
import os
import signal
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

# two private helpers of detectron2's launch (through solo_d2.compat): the worker's entry point
# (process group, local group, device) and the free port of dist_url "auto"
from ..compat import distributed_worker, find_free_port, release_process_groups
from .hooks import PREEMPTED_EXIT_STATUS, PREEMPTION_SIGNALS, TrainingPreempted

__all__ = [
    "PreflightFailed",
    "TorchrunEnv",
    "check_torchrun_arguments",
    "distributed_backend",
    "launch",
    "launch_from_env",
    "prepare_forked_workers",
    "torchrun_env",
]

WORKER_EXIT_GRACE_S = 10
"""Once a worker process has exited with an error or a preemption, the time the others have to
exit by themselves (the other ranks of a preempted training are exiting too) before they are
terminated."""


def launch(
    main_func,
    num_gpus_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
    fork_threads: Optional[int] = None,
):
    """detectron2's :func:`~detectron2.engine.launch` (same arguments), preemption-aware, and
    able to fork CPU workers.

    With one process in all, ``main_func(*args)`` runs in this process, as in detectron2. With
    several, this process starts the workers and waits for them. They are spawned (fresh
    interpreters, as in detectron2), or, with ``fork_threads``, forked: they start with this
    process's imports and registered datasets instead of importing torch, detectron2 and solo_d2
    again (4-5 s of every start on a 2-core machine), then run torch on ``fork_threads``
    threads. Forking is for CPU training only (CUDA does not survive a fork), from a process whose
    torch ops all ran on one thread (:func:`prepare_forked_workers`). Then:

    * SIGTERM and SIGUSR1 do not end it (and its workers with it): they are forwarded to the
      workers, which may not have received them (Kubernetes signals the container's first
      process only; ``kill PID``); a worker receiving one twice stops the same way;
    * when a worker exits, the others have ``WORKER_EXIT_GRACE_S`` seconds to exit by themselves
      before they are terminated (torch terminates them at once);
    * when a worker exits with :data:`~.hooks.PREEMPTED_EXIT_STATUS`, this process raises
      :class:`~.hooks.TrainingPreempted`: it exits with that status, without a traceback.

    Raises:
        ValueError: ``fork_threads`` given while this process runs torch on several threads.
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        return main_func(*args)
    if fork_threads is not None and torch.get_num_threads() != 1:
        raise ValueError(
            f"launch(fork_threads={fork_threads}) in a process running torch on "
            f"{torch.get_num_threads()} threads: call prepare_forked_workers() before its first "
            "torch op (a forked worker would hang in its first multi-threaded op)"
        )
    if dist_url == "auto":
        assert num_machines == 1, "dist_url=auto not supported in multi-machine jobs."
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    if num_machines > 1 and dist_url.startswith("file://"):
        logging.getLogger(__name__).warning(
            "file:// is not a reliable init_method in multi-machine jobs. Prefer tcp://"
        )
    if fork_threads is not None:
        _release_free_memory()  # not copied into every worker's resident memory
    context = mp.start_processes(
        distributed_worker,
        nprocs=num_gpus_per_machine,
        args=(
            functools.partial(_worker_main, main_func, fork_threads),
            world_size,
            num_gpus_per_machine,
            machine_rank,
            dist_url,
            args,
            timeout,
        ),
        daemon=False,
        join=False,
        start_method="spawn" if fork_threads is None else "fork",
    )

    def forward(signum, frame):
        for process in context.processes:
            if process.is_alive():  # not reaped yet: its pid is still this worker's
                os.kill(process.pid, signum)

    previous_handlers = {s: signal.signal(s, forward) for s in PREEMPTION_SIGNALS}
    try:
        while not context.join(grace_period=WORKER_EXIT_GRACE_S):
            pass
    except mp.ProcessExitedException as e:
        if e.exit_code == PREEMPTED_EXIT_STATUS:
            raise TrainingPreempted() from None
        raise
    finally:
        _restore_handlers(previous_handlers)


def prepare_forked_workers() -> int:
    """Keep this process's torch ops on one thread from now on, so that :func:`launch` may fork
    its workers; returns the number of threads it had, the workers' ``fork_threads``.

    Call it before this process's first torch op. torch's CPU ops run on GNU OpenMP's thread
    team, which a fork does not copy: a forked child whose parent had started the team hangs in
    its first multi-threaded op. One thread never starts it. (numpy's OpenBLAS and OpenCV threads
    survive a fork.)
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def _release_free_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the system (glibc's
    ``malloc_trim``; nothing elsewhere): after reading and checking a large annotation file the
    launching process holds gigabytes it freed, which forked workers would count as theirs."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _worker_main(main_func, threads: Optional[int], *args):
    """``main_func(*args)`` in a worker that :func:`launch` started (a forked one first gets its
    ``threads`` back); after it returns, or stops the training by a preemption (all ranks
    together), the process groups are closed (:func:`_close_process_groups`), so that the worker
    exits with its own status."""
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result = main_func(*args)
    except TrainingPreempted:
        _close_process_groups()
        raise
    _close_process_groups()
    return result


def _close_process_groups() -> None:
    """Destroy the process groups and free them now
    (:func:`~solo_d2.compat.release_process_groups`): left to the interpreter's shutdown, Gloo's
    threads sometimes abort the process (SIGABRT, "terminate called without an active
    exception") after its work is done, which turns a finished training, or a preempted one's
    status 75, into a failure."""
    if dist.is_initialized():
        dist.destroy_process_group()
    release_process_groups()


# ---- torchrun ------------------------------------------------------------------------------------
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
"""The variables that torchrun (and so Kubernetes PyTorchJob, SLURM ``srun torchrun``) sets for
each process it starts, besides ``MASTER_ADDR`` and ``MASTER_PORT`` (``init_method="env://"``).
Any of them set means "started by torchrun"."""


@dataclass(frozen=True)
class TorchrunEnv:
    """Where this process is in a training that torchrun started (:func:`torchrun_env`)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def num_machines(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def machine_rank(self) -> int:
        return self.rank // self.local_world_size


def torchrun_env(environ: Optional[Mapping[str, str]] = None) -> Optional[TorchrunEnv]:
    """This process's ranks from torchrun's variables (``environ``: ``os.environ``); None when
    none of :data:`TORCHRUN_VARIABLES` is set.

    Raises:
        ValueError: a one-line message when some are missing (a Kubernetes PyTorchJob without
            torchrun sets ``RANK`` and ``WORLD_SIZE`` only) or invalid, or when the ranks of a
            machine are not consecutive (detectron2's local process group needs machine ``m`` to
            hold ranks ``m * LOCAL_WORLD_SIZE`` to ``(m + 1) * LOCAL_WORLD_SIZE - 1``, as
            torchrun numbers them when every machine starts the same ``--nproc-per-node``).
    """
    environ = os.environ if environ is None else environ
    if not any(name in environ for name in TORCHRUN_VARIABLES):
        return None
    needed = (*TORCHRUN_VARIABLES, "MASTER_ADDR", "MASTER_PORT")
    missing = [name for name in needed if not environ.get(name)]
    if missing:
        raise ValueError(
            f"{', '.join(missing)} not set while {', '.join(n for n in needed if n not in missing)}"
            " are: start train_net.py with torchrun (python -m torch.distributed.run), which sets "
            f"them all, or unset them for a single-process run"
        )
    values = {}
    for name in (*TORCHRUN_VARIABLES, "MASTER_PORT"):
        try:
            values[name] = int(environ[name])
        except ValueError:
            raise ValueError(f"{name}={environ[name]!r} is not an integer") from None
    env = TorchrunEnv(*(values[name] for name in TORCHRUN_VARIABLES))
    if not (0 <= env.rank < env.world_size and 0 <= env.local_rank < env.local_world_size):
        raise ValueError(
            f"RANK {env.rank}, WORLD_SIZE {env.world_size}, LOCAL_RANK {env.local_rank}, "
            f"LOCAL_WORLD_SIZE {env.local_world_size}: a rank outside its world"
        )
    if env.world_size % env.local_world_size or env.rank % env.local_world_size != env.local_rank:
        raise ValueError(
            f"RANK {env.rank} of WORLD_SIZE {env.world_size} with LOCAL_RANK {env.local_rank} of "
            f"LOCAL_WORLD_SIZE {env.local_world_size}: every machine must run the same number of "
            "processes (the same torchrun --nproc-per-node), ranked consecutively"
        )
    return env


def check_torchrun_arguments(env: TorchrunEnv, args, defaults) -> None:
    """Refuse detectron2 launch arguments that contradict torchrun's variables, then set them from
    those (``args.num_gpus`` is ``LOCAL_WORLD_SIZE``, ``args.dist_url`` ``"env://"``, ...).

    Under torchrun they start nothing: torchrun started the processes. A value left at its
    default (``defaults``: the parser, or anything with ``get_default(name)``), or one that agrees,
    is accepted.

    Raises:
        ValueError: one line naming the contradicting arguments.
    """
    from_env = {
        "num_gpus": (env.local_world_size, "LOCAL_WORLD_SIZE"),
        "num_machines": (env.num_machines, "WORLD_SIZE / LOCAL_WORLD_SIZE"),
        "machine_rank": (env.machine_rank, "RANK // LOCAL_WORLD_SIZE"),
        "dist_url": ("env://", "MASTER_ADDR:MASTER_PORT"),
    }
    conflicts = [
        f"--{name.replace('_', '-')} {getattr(args, name)} (torchrun: {source} = {value})"
        for name, (value, source) in from_env.items()
        if getattr(args, name) not in (value, defaults.get_default(name))
    ]
    if conflicts:
        raise ValueError(
            "started by torchrun, which gives the processes and their ranks, but "
            f"{'; '.join(conflicts)}: leave out --num-gpus, --num-machines, --machine-rank and "
            "--dist-url (torchrun's --nnodes and --nproc-per-node set them)"
        )
    for name, (value, _) in from_env.items():
        setattr(args, name, value)


class PreflightFailed(Exception):
    """Raised by :func:`launch_from_env` on every rank when a machine's preflight failed.

    Attributes:
        message: the failure, one line.
        report: True on the process that reports it (local rank 0 of each machine), so that it is
            printed once per machine.
    """

    def __init__(self, message: str, report: bool):
        super().__init__(message)
        self.message, self.report = message, report


def launch_from_env(
    main_func,
    args=(),
    *,
    preflight=None,
    device: str = "cuda",
    env: Optional[TorchrunEnv] = None,
    timeout=DEFAULT_TIMEOUT,
):
    """Run ``main_func(*args)`` as one process of a training that torchrun started.

    What detectron2's launch worker does, with torchrun's variables (:func:`torchrun_env`): the
    process group (``init_method="env://"``; NCCL when ``device`` is CUDA and there are CUDA GPUs
    for all the machine's processes, GLOO otherwise, ``MODEL.DEVICE cpu`` included), detectron2's
    local process group, the CUDA device ``LOCAL_RANK``; then:

    * ``preflight(*args)``, when given, runs on local rank 0 of each machine only, while the
      other ranks wait: it returns None, or a one-line error message, and may complete ``args``
      in place (the machine's other ranks then get them). When a machine's preflight fails, no
      rank runs ``main_func`` and all raise :class:`PreflightFailed`.
    * Outside training (where :class:`~.hooks.PreemptionHook` handles them), SIGTERM and SIGUSR1
      end the process with :class:`~.hooks.TrainingPreempted`, exit status 75: torchrun sends
      SIGTERM to all its workers when it is signalled, and to the remaining ones when one exits
      (a preempted rank); after a stop they are ignored, so that every rank exits with its own
      status (75, or 2 after a failed preflight).

    Args:
        device: ``MODEL.DEVICE`` ("cuda", "cpu", ...), which decides the backend.
        env: the ranks; None: :func:`torchrun_env` (which must not be None).
    """
    env = env or torchrun_env()
    if env is None:
        raise ValueError("launch_from_env: not started by torchrun (RANK, WORLD_SIZE, ... unset)")
    previous_handlers = {s: signal.signal(s, _exit_preempted) for s in PREEMPTION_SIGNALS}
    try:
        backend = distributed_backend(device, env.local_world_size)
        dist.init_process_group(
            backend, init_method="env://", world_size=env.world_size, rank=env.rank,
            timeout=timeout,
        )  # fmt: skip
        try:
            comm.create_local_process_group(env.local_world_size)
            if backend == dist.Backend.NCCL:
                torch.cuda.set_device(env.local_rank)
            if preflight is not None:
                args = _preflight_on_local_rank_0(preflight, args, env)
            comm.synchronize()
            result = main_func(*args)
        finally:
            _close_process_groups()
    except (TrainingPreempted, PreflightFailed):
        _ignore_preemption_signals()  # until the process exits, with its status
        raise
    except BaseException:
        _restore_handlers(previous_handlers)
        raise
    _restore_handlers(previous_handlers)
    return result


def distributed_backend(device: str, processes_per_machine: int) -> str:
    """NCCL for a CUDA ``device`` with at least ``processes_per_machine`` CUDA GPUs, else GLOO
    (a preflight then reports the missing GPUs)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return dist.Backend.GLOO
    enough = torch.cuda.device_count() >= processes_per_machine
    return dist.Backend.NCCL if enough else dist.Backend.GLOO


def _preflight_on_local_rank_0(preflight, args, env: TorchrunEnv):
    """``preflight(*args)`` on local rank 0 of each machine; every rank gets its machine's
    ``args`` back, or raises :class:`PreflightFailed` if any machine's preflight failed (or
    raised: that machine's local rank 0 raises the exception itself)."""
    outcome, crash = None, None
    if env.local_rank == 0:
        try:
            outcome = (preflight(*args), args)
        except Exception as e:  # a bug: the other ranks stop too, this one with its traceback
            outcome, crash = (f"preflight failed: {type(e).__name__}: {e}", args), e
    outcomes = comm.all_gather(outcome)  # over GLOO; also the other ranks' wait for the preflight
    if crash is not None:
        raise crash
    errors = {
        machine: outcomes[machine * env.local_world_size][0]
        for machine in range(env.num_machines)
        if outcomes[machine * env.local_world_size][0] is not None
    }
    if errors:
        message = errors.get(env.machine_rank)
        if message is None:
            machine, first = next(iter(errors.items()))
            message = f"{first} (on machine rank {machine})"
        raise PreflightFailed(message, report=env.local_rank == 0)
    return outcomes[env.machine_rank * env.local_world_size][1]


def _exit_preempted(signum, frame):
    _ignore_preemption_signals()
    logging.getLogger(__name__).warning(
        f"{signal.Signals(signum).name} received outside training: exiting with status "
        f"{PREEMPTED_EXIT_STATUS} (requeue), continue with --resume"
    )
    raise TrainingPreempted()


def _restore_handlers(handlers) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def _ignore_preemption_signals() -> None:
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
