"""fluxion: a pure-PyTorch FLUX.1 text-to-image system that runs anywhere."""

__version__ = "0.1.0"
