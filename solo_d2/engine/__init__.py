"""Training SOLO-family models with detectron2's ``DefaultTrainer``."""

from .hooks import PREEMPTED_EXIT_STATUS, PreemptionHook, TrainingPreempted
from .launch import launch
from .preflight import check_config
from .trainer import Trainer, create_ddp_model

__all__ = [
    "PREEMPTED_EXIT_STATUS",
    "PreemptionHook",
    "Trainer",
    "check_config",
    "TrainingPreempted",
    "create_ddp_model",
    "launch",
]
