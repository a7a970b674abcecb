"""Checkpoints: safetensors-only loading and atomic saving, BFL <-> diffusers key maps, config detection."""

from .detect import (SCALE_FACTOR_KEY, SHIFT_FACTOR_KEY, default_axes_dim, detect_autoencoder_params, detect_layout,
                     detect_params, detect_transformer_params, diffusers_config, params_from_diffusers_config,
                     params_metadata)
from .io import (CheckpointInfo, TensorInfo, check_state_dict, load_into, load_state_dict, read_checkpoint_info,
                 save_state_dict)
from .keymaps import (AUTOENCODER_KEYMAP, KEYMAPS, TRANSFORMER_KEYMAP, KeyMap, Rule, convert_state_dict, to_bfl,
                      to_diffusers)
from .loaders import (CheckpointSource, convert_checkpoint, export_diffusers, load_autoencoder, load_transformer,
                      open_checkpoint)

__all__ = [
    "AUTOENCODER_KEYMAP", "KEYMAPS", "SCALE_FACTOR_KEY", "SHIFT_FACTOR_KEY", "TRANSFORMER_KEYMAP",
    "CheckpointInfo", "CheckpointSource", "KeyMap", "Rule", "TensorInfo",
    "check_state_dict", "convert_checkpoint", "convert_state_dict", "default_axes_dim", "detect_autoencoder_params",
    "detect_layout", "detect_params", "detect_transformer_params", "diffusers_config", "export_diffusers",
    "load_autoencoder", "load_into", "load_state_dict", "load_transformer", "open_checkpoint",
    "params_from_diffusers_config", "params_metadata", "read_checkpoint_info", "save_state_dict", "to_bfl",
    "to_diffusers",
]
