"""FLUX model definitions: configs, the MM-DiT transformer and the autoencoder."""

from .autoencoder import AutoEncoder
from .configs import AUTOENCODER_PRESETS, TRANSFORMER_PRESETS, AutoEncoderParams, FluxParams
from .transformer import Flux

__all__ = ["AUTOENCODER_PRESETS", "TRANSFORMER_PRESETS", "AutoEncoder", "AutoEncoderParams", "Flux", "FluxParams"]
