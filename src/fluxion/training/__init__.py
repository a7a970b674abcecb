"""The training engine of the in-house family: one config-driven loop for the VAE, flow-matching, guidance- and
few-step-distillation stages."""

from .config import ConfigError, TrainConfig, load_config, parse_config
from .loop import TrainingDiverged, export, run

__all__ = ["ConfigError", "TrainConfig", "TrainingDiverged", "export", "load_config", "parse_config", "run"]
