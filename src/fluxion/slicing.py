"""VAE slicing: decode a batch one image at a time, so the decoder's working memory is one image's, not the batch's.

Each image's pixels go straight into one output tensor allocated for the batch, so the peak is that output plus one
image's decode (VAE tiling, which bounds one image's decode by a tile's, composes: tiled=True).
"""

from torch import Tensor

from .memory import vae_bytes
from .model import AutoEncoder
from .model.configs import AutoEncoderParams


def decode_sliced(autoencoder: AutoEncoder, latents: Tensor, tiled: bool = False) -> Tensor:
    """latents (B, z, h, w) -> pixels (B, 3, H, W), as autoencoder.decode (or decode_tiled) of the whole batch."""
    decode = autoencoder.decode_tiled if tiled else autoencoder.decode
    out = None
    for i in range(latents.shape[0]):
        pixels = decode(latents[i:i + 1])
        if out is None:
            out = pixels.new_empty((latents.shape[0], *pixels.shape[1:]))
        out[i:i + 1] = pixels
        del pixels  # freed before the next image's decode starts
    if out is None:
        raise ValueError("decode_sliced: the batch is empty")
    return out


def sliced_vae_bytes(params: AutoEncoderParams, height: int, width: int, batch: int, itemsize: int,
                     tiled: bool = False) -> int:
    """Working memory of decode_sliced: one image's decode (memory.vae_bytes at batch 1) plus the batch's output."""
    return vae_bytes(params, height, width, 1, itemsize, tiled) + batch * params.out_ch * height * width * itemsize

