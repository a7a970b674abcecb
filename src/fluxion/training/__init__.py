"""The training engine of the in-house family: one config-driven loop for the VAE, flow-matching, guidance- and
few-step-distillation stages."""

from .config import ConfigError, TrainConfig, load_config, load_stages, parse_config, parse_stages
from .loop import TrainingDiverged, export, run, run_recipe

__all__ = ["ConfigError", "TrainConfig", "TrainingDiverged", "export", "load_config", "load_stages", "parse_config",
           "parse_stages", "run", "run_recipe"]
