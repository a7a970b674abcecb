"""fluxion: a pure-PyTorch FLUX.1 text-to-image system that runs anywhere."""

__version__ = "0.1.0"

# Public API, imported lazily so `import fluxion` stays fast (torch and transformers load on first use).
_EXPORTS = {
    "Pipeline": "fluxion.pipeline",
    "load_transformer": "fluxion.checkpoints",
    "load_autoencoder": "fluxion.checkpoints",
    "load_state_dict": "fluxion.checkpoints",
    "save_state_dict": "fluxion.checkpoints",
    "read_checkpoint_info": "fluxion.checkpoints",
    "convert_checkpoint": "fluxion.checkpoints",
    "export_diffusers": "fluxion.checkpoints",
    "Flux": "fluxion.model",
    "FluxParams": "fluxion.model",
    "AutoEncoder": "fluxion.model",
    "AutoEncoderParams": "fluxion.model",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fluxion' has no attribute {name!r}")


__all__ = ["__version__", *_EXPORTS]
