#!/usr/bin/env python3
"""Train and evaluate SOLO-family models with detectron2's DefaultTrainer.

    python train_net.py --config-file configs/SOLOv2_R50_3x.yaml --num-gpus 8
    torchrun --nproc-per-node 8 train_net.py --config-file configs/SOLOv2_R50_3x.yaml
    python train_net.py --config-file configs/SOLOv2_R50_3x.yaml --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file SOLOv2_R50_3x ...   # a model zoo name works anywhere
    python train_net.py --config-file ... --dataset mydata_train=ann.json:images/ \
        DATASETS.TRAIN "('mydata_train',)" MODEL.SOLO.NUM_CLASSES 3

Before any process is launched, the devices, the datasets, the config and the weights are
checked: a mistake (an unknown config key, NUM_CLASSES disagreeing with a dataset, a missing
weights file, an annotation file that is not COCO, a builtin dataset such as coco_2017_train
missing on disk, --num-gpus above the GPUs present, ...) ends the run with one
"train_net.py: error: ..." line and exit status 2. Without CUDA, one process runs on the CPU
after a one-line warning (MODEL.DEVICE cpu); --num-gpus N with MODEL.DEVICE cpu forks N CPU
processes (they start with this process's imports and datasets). Started by torchrun, the
processes take their ranks from its variables (--num-gpus and the other launch arguments start
nothing: a contradicting one is an error), and the checks run on local rank 0 of each machine
while the others wait (docs/training.md).

Preemption: on SIGTERM or SIGUSR1 (what job schedulers send), training stops after the current
iteration, writes a checkpoint of it, logs "Stopped by SIGTERM after iteration N: ..." and exits
with status 75 (EX_TEMPFAIL: requeue the job); --resume continues at iteration N + 1.
"""

import os
import sys
import warnings
from typing import NoReturn, Optional

import torch
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from solo_d2.checkpoint import AtomicCheckpointer, load_checkpoint_file
from solo_d2.config import ConfigError, load_config
from solo_d2.engine import Trainer, launch
from solo_d2.engine.cli import add_dataset_arguments, register_datasets_from_args
from solo_d2.engine.launch import (
    PreflightFailed,
    check_torchrun_arguments,
    launch_from_env,
    prepare_forked_workers,
    torchrun_env,
)
from solo_d2.engine.preflight import check_config
from solo_d2.model_zoo import resolve_config_file


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="solo_d2")
    return cfg


def check_devices(args, cfg) -> None:
    """Match a config on CUDA (detectron2's default MODEL.DEVICE) with the GPUs present.

    Without CUDA, one process (``--num-gpus 1``) runs on the CPU with a one-line warning, as the
    demo does: ``MODEL.DEVICE cpu`` is added to ``args.opts`` (which the worker reads) and
    ``cfg``. With ``MODEL.DEVICE cpu``, ``--num-gpus N`` starts N CPU processes.

    Raises:
        ConfigError: ``--num-gpus`` asks for more GPUs than are visible.
    """
    if not cfg.MODEL.DEVICE.startswith("cuda"):
        return
    with warnings.catch_warnings():  # torch may warn "CUDA initialization: ...": said below
        warnings.simplefilter("ignore")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.num_gpus > max(gpus, 1):
        raise ConfigError(
            f"--num-gpus {args.num_gpus} but no CUDA GPU is available (torch.cuda.is_available() "
            f"is False); add MODEL.DEVICE cpu to run {args.num_gpus} processes on the CPU"
            if gpus == 0
            else f"--num-gpus {args.num_gpus} but only {gpus} CUDA GPU(s) are visible; use "
            f"--num-gpus {gpus} or fewer"
        )
    if gpus == 0:
        print(
            "train_net.py: warning: no CUDA GPU is available (torch.cuda.is_available() is "
            "False), running on the CPU (MODEL.DEVICE cpu)",
            file=sys.stderr,
        )
        args.opts = [*(args.opts or []), "MODEL.DEVICE", "cpu"]
        cfg.MODEL.DEVICE = "cpu"


def preflight(args) -> None:
    """Resolve ``--config-file`` (a file, else a model zoo name: ``args.config_file`` becomes its
    path), check the devices, register the datasets, check the config and read a local
    MODEL.WEIGHTS file (refused without running anything if it holds more than weights), before
    any work starts. ``--eval-only`` needs only the ``DATASETS.TEST`` datasets.

    Raises:
        ConfigError, ValueError, OSError: with a one-line message (UnsafeCheckpointError is a
            ValueError).
    """
    args.config_file = resolve_config_file(args.config_file)
    cfg = load_config(args.config_file, args.opts)
    check_devices(args, cfg)
    register_datasets_from_args(args)
    splits = ("TEST",) if args.eval_only else ("TRAIN", "TEST")
    check_config(cfg, resume=args.resume, splits=splits)
    if os.path.isfile(cfg.MODEL.WEIGHTS):
        load_checkpoint_file(cfg.MODEL.WEIGHTS)


def main(args):
    register_datasets_from_args(args)  # in every worker process
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def get_parser():
    parser = default_argument_parser()
    add_dataset_arguments(parser)
    return parser


def preflight_error(args) -> Optional[str]:
    """:func:`preflight`'s error message, None when all is well."""
    try:
        preflight(args)
    except (ConfigError, ValueError, OSError) as e:  # DatasetError is a ValueError
        return str(e)
    return None


def config_device(args) -> str:
    """The config's MODEL.DEVICE, which decides the process group's backend under torchrun
    ("cpu" when the config does not load: the preflight then says why)."""
    try:
        return load_config(resolve_config_file(args.config_file), args.opts).MODEL.DEVICE
    except (ConfigError, ValueError, OSError):
        return "cpu"


def fail(message: str) -> NoReturn:
    print(f"train_net.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def invoke_main() -> None:
    parser = get_parser()
    args = parser.parse_args()
    try:
        env = torchrun_env()  # None unless started by torchrun
        if env is not None:
            check_torchrun_arguments(env, args, parser)
    except ValueError as e:
        if os.environ.get("LOCAL_RANK", "0") == "0":  # once per machine
            fail(str(e))
        sys.exit(2)
    if env is None or env.local_rank == 0:
        print("Command Line Args:", args)
    if env is not None:  # torchrun started this process: the preflight runs on local rank 0
        try:
            launch_from_env(main, (args,), preflight=preflight_error, device=config_device(args))
        except PreflightFailed as e:
            if e.report:
                fail(e.message)
            sys.exit(2)
        return
    fork_threads = None  # CPU workers are forked: they skip the imports this process did
    if args.num_gpus * args.num_machines > 1 and config_device(args) == "cpu":
        fork_threads = prepare_forked_workers()  # before this process's first torch op
    error = preflight_error(args)
    if error is not None:
        fail(error)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        fork_threads=fork_threads,
    )


if __name__ == "__main__":
    invoke_main()
