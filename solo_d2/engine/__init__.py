"""Training SOLO-family models with detectron2's ``DefaultTrainer``."""

from .trainer import Trainer, create_ddp_model

__all__ = ["Trainer", "create_ddp_model"]
