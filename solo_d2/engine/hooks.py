"""Training hooks: stopping cleanly, with a checkpoint, when a cluster preempts the training;
plotting the losses (:class:`LossCurveHook`).

Job schedulers end a job with a signal and kill it for good a grace period later: SLURM sends
SIGTERM on preemption or cancellation (and, with ``--signal=USR1@120``, SIGUSR1 before the time
limit), Kubernetes and cloud spot instances send SIGTERM. :class:`PreemptionHook` turns either
signal into a clean stop: the current iteration finishes, a checkpoint of it is written, and the
process exits with :data:`PREEMPTED_EXIT_STATUS` (75, ``EX_TEMPFAIL``: "try again"); ``--resume``
continues at the next iteration. :func:`solo_d2.engine.launch` carries the signal to the worker
processes and their exit status back to the launching process.

Schedulers may signal every process of the job (SLURM signals all processes of a job step, a
shell's ``kill -- -PGID`` a process group), DataLoader workers included, and torch's DataLoader
workers die of a SIGTERM that does not come from their parent, which fails the training process
at once ("DataLoader worker ... is killed by signal: Terminated"). The workers of the loaders
given to :func:`leave_signals_to_trainer` leave these signals to the training process.
"""

import logging
import os
import signal
import threading

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.utils.data import DataLoader

__all__ = [
    "PREEMPTED_EXIT_STATUS",
    "PREEMPTION_SIGNALS",
    "LossCurveHook",
    "PreemptionHook",
    "TrainingPreempted",
    "leave_signals_to_trainer",
]

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_STATUS = 75
"""Exit status of a training stopped by a preemption signal after writing its checkpoint:
``EX_TEMPFAIL`` of sysexits.h ("temporary failure, try again"). A SLURM batch script requeues
the job on it (``scontrol requeue $SLURM_JOB_ID``); a Kubernetes Job retries it as a failure."""

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""SIGTERM: preemption, cancellation, node drain, spot reclaim; SIGUSR1: SLURM's usual signal
ahead of the time limit (``#SBATCH --signal=USR1@120``)."""


class TrainingPreempted(SystemExit):
    """Raised by :class:`PreemptionHook` once the checkpoint is written.

    A ``SystemExit`` with status :data:`PREEMPTED_EXIT_STATUS`: detectron2's training loop lets it
    through without logging it as an error (its ``after_train`` hooks still run), and uncaught it
    ends the process, with no traceback, with that status.
    """

    def __init__(self):
        super().__init__(PREEMPTED_EXIT_STATUS)


class PreemptionHook(HookBase):
    """Stops training after the iteration during which SIGTERM or SIGUSR1 arrived.

    Its signal handlers, installed for the duration of ``train()`` (in the main thread), only
    record the signal. After each iteration the ranks agree on whether any of them received one
    (an all-reduce of one integer: 0.2-0.4 ms between two CPU processes with GLOO), so that all
    stop after the same iteration. Then rank 0 writes ``model_{iteration:07d}.pth`` (model,
    optimizer, scheduler, iteration) through the trainer's checkpointer, which tags it in
    ``last_checkpoint``; all ranks wait for it, log one line and raise :class:`TrainingPreempted`.

    Register it before detectron2's ``EvalHook``, so that a stop does not wait for an evaluation
    (an evaluation due at the stopping iteration is not run; ``--resume`` does not run it either).
    A signal received during the last iteration does not stop training, which is then complete
    (detectron2's ``PeriodicCheckpointer`` writes ``model_final.pth``); its evaluation follows.
    """

    def __init__(self):
        self._received = 0  # number of the last preemption signal received, 0: none
        self._previous_handlers = {}
        self._flag = None  # the tensor of the cross-rank agreement, on the process group's device

    def _record_signal(self, signum, frame):
        self._received = signum

    def before_train(self):
        if threading.current_thread() is threading.main_thread():
            for signum in PREEMPTION_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._record_signal)
        else:
            logger.warning("Training outside the main thread: SIGTERM and SIGUSR1 are not handled")
        if comm.get_world_size() > 1:
            nccl = dist.get_backend() == dist.Backend.NCCL
            self._flag = torch.zeros(1, dtype=torch.int32, device="cuda" if nccl else "cpu")

    def after_train(self):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def after_step(self):
        iteration = self.trainer.iter
        if iteration >= self.trainer.max_iter - 1:
            if self._received:
                logger.info(
                    f"{signal.Signals(self._received).name} received during the last iteration: "
                    "training is complete, finishing the run"
                )
            return
        received = self._any_rank_received()
        if received:
            self._stop(signal.Signals(received).name, iteration)

    def _any_rank_received(self) -> int:
        """The largest signal number received by any rank, 0 if none (the same on all ranks)."""
        if self._flag is None:
            return self._received
        self._flag.fill_(self._received)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        return int(self._flag.item())

    def _stop(self, signal_name: str, iteration: int):
        checkpointer = self.trainer.checkpointer
        name = f"model_{iteration:07d}"
        if comm.is_main_process():
            checkpointer.save(name, iteration=iteration)  # as detectron2's PeriodicCheckpointer
        comm.synchronize()
        logger.info(
            f"Stopped by {signal_name} after iteration {iteration}: checkpoint "
            f"{os.path.join(checkpointer.save_dir, name)}.pth written; exiting with status "
            f"{PREEMPTED_EXIT_STATUS} (requeue), continue with --resume"
        )
        raise TrainingPreempted()


def _ignore_signals_but_parent_sigterm() -> None:
    """In a DataLoader worker: ignore the preemption signals, except a SIGTERM from the parent
    (shutting its workers down), which ends the worker with status 0 as torch's handler does.

    They are blocked in this thread (and so in the threads it starts later) and taken by a thread
    that waits for them, which sees who sent them (a handler would not).
    """
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)

    def wait_for_signals():
        while True:
            received = signal.sigwaitinfo(PREEMPTION_SIGNALS)
            if received.si_signo == signal.SIGTERM and received.si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait_for_signals, name="preemption-signals", daemon=True).start()


class _WorkerInit:
    """A DataLoader ``worker_init_fn``: :func:`_ignore_signals_but_parent_sigterm`, then the
    loader's own ``worker_init_fn``."""

    def __init__(self, worker_init_fn):
        self.worker_init_fn = worker_init_fn

    def __call__(self, worker_id: int) -> None:
        _ignore_signals_but_parent_sigterm()
        if self.worker_init_fn is not None:
            self.worker_init_fn(worker_id)


def leave_signals_to_trainer(loader):
    """Make the workers of a detectron2 data loader leave SIGTERM and SIGUSR1 to the training
    process: they keep loading until it stops, and end when it shuts them down or exits.

    The workers are forked (Linux's default, but not in processes that torch's spawn started, as
    :func:`solo_d2.engine.launch` does for GPU training): a forked worker starts with one thread,
    which blocks the signals for all the threads it starts; a spawned one has threads already.

    Args:
        loader: what detectron2's ``build_detection_train_loader`` or ``_test_loader`` returns:
            a torch DataLoader, or an ``AspectRatioGroupedDataset`` that batches one.

    Returns:
        ``loader``.
    """
    torch_loader = loader if isinstance(loader, DataLoader) else getattr(loader, "dataset", None)
    if not isinstance(torch_loader, DataLoader):
        raise TypeError(f"Expected a DataLoader or a wrapper of one (.dataset), got {loader!r}")
    if torch_loader.num_workers > 0:
        torch_loader.multiprocessing_context = "fork"
        torch_loader.worker_init_fn = _WorkerInit(torch_loader.worker_init_fn)
    return loader


class LossCurveHook(HookBase):
    """Writes ``loss_curve.png`` (:func:`solo_d2.visualization.training_plots.plot_loss_curve`)
    into the output folder after every evaluation and at the end of training, main process only.

    Register it after detectron2's ``PeriodicWriter``, so that ``metrics.json`` holds the
    iteration just logged. The evaluations are those of detectron2's ``EvalHook`` with the same
    ``eval_period`` (``TEST.EVAL_PERIOD``): after each iteration ``i`` with ``i + 1`` a multiple
    of it, except the last (evaluated after training). A failed plot logs a warning and training
    goes on.
    """

    def __init__(self, output_dir: str, eval_period: int = 0):
        """
        Args:
            output_dir: where ``metrics.json`` is and ``loss_curve.png`` is written.
            eval_period: ``TEST.EVAL_PERIOD``; 0: plot at the end of training only.
        """
        self.output_dir = output_dir
        self.eval_period = eval_period

    def plot(self) -> None:
        """Write the plot now (main process only; nothing without ``metrics.json``)."""
        from ..visualization.training_plots import LOSS_CURVE_FILE, plot_loss_curve

        if not comm.is_main_process():
            return
        metrics = os.path.join(self.output_dir, "metrics.json")
        if not os.path.isfile(metrics):
            return
        out = os.path.join(self.output_dir, LOSS_CURVE_FILE)
        try:
            if plot_loss_curve(metrics, out):
                logger.info(f"Loss curve written to {out}")
        except Exception as e:  # a plot must never stop training
            logger.warning(f"Could not plot the loss curve {out}: {type(e).__name__}: {e}")

    def after_step(self):
        next_iter = self.trainer.iter + 1
        evaluated = self.eval_period > 0 and next_iter % self.eval_period == 0
        if evaluated and next_iter != self.trainer.max_iter:
            self.plot()

    def after_train(self):
        self.plot()
