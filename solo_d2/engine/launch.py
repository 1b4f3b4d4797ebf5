"""detectron2's ``launch`` for training that a preemption signal may stop (see :mod:`.hooks`)."""

import logging
import os
import signal

import torch.multiprocessing as mp
from detectron2.engine.launch import DEFAULT_TIMEOUT

# two private helpers of detectron2's launch (through solo_d2.compat): the worker's entry point
# (process group, local group, device) and the free port of dist_url "auto"
from ..compat import distributed_worker, find_free_port
from .hooks import PREEMPTED_EXIT_STATUS, PREEMPTION_SIGNALS, TrainingPreempted

__all__ = ["launch"]

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
):
    """detectron2's :func:`~detectron2.engine.launch` (same arguments), preemption-aware.

    With one process in all, ``main_func(*args)`` runs in this process, as in detectron2. With
    several, this process spawns the workers and waits for them; then:

    * SIGTERM and SIGUSR1 do not end it (and its workers with it): they are forwarded to the
      workers, which may not have received them (Kubernetes signals the container's first
      process only; ``kill PID``); a worker receiving one twice stops the same way;
    * when a worker exits, the others have ``WORKER_EXIT_GRACE_S`` seconds to exit by themselves
      before they are terminated (torch terminates them at once);
    * when a worker exits with :data:`~.hooks.PREEMPTED_EXIT_STATUS`, this process raises
      :class:`~.hooks.TrainingPreempted`: it exits with that status, without a traceback.
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url == "auto":
        assert num_machines == 1, "dist_url=auto not supported in multi-machine jobs."
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    if num_machines > 1 and dist_url.startswith("file://"):
        logging.getLogger(__name__).warning(
            "file:// is not a reliable init_method in multi-machine jobs. Prefer tcp://"
        )
    context = mp.start_processes(
        distributed_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        join=False,
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
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
