"""Training SOLO-family models with detectron2's ``DefaultTrainer``; inference models from a
config and weights (:func:`load_model`, :class:`SOLOPredictor`)."""

from .hooks import PREEMPTED_EXIT_STATUS, PreemptionHook, TrainingPreempted
from .launch import launch, launch_from_env
from .predictor import (
    BadWeightsError,
    SOLOPredictor,
    WeightsUnavailableError,
    load_model,
    resolve_weights,
)
from .preflight import check_config
from .trainer import Trainer, create_ddp_model

__all__ = [
    "BadWeightsError",
    "PREEMPTED_EXIT_STATUS",
    "PreemptionHook",
    "SOLOPredictor",
    "Trainer",
    "check_config",
    "TrainingPreempted",
    "WeightsUnavailableError",
    "create_ddp_model",
    "launch",
    "launch_from_env",
    "load_model",
    "resolve_weights",
]
