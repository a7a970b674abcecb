"""Rectified-flow sampling as free functions: noise, packing, position ids, the shifted schedule, the Euler loop."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .model.transformer import Flux
from .settings import FLUX_SHIFT, ShiftSchedule

LATENT_CHANNELS = 16


def get_noise(seeds: Sequence[int], height: int, width: int, *, channels: int = LATENT_CHANNELS,
              downsample: int = 8, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """One latent noise tensor per seed, drawn by a CPU generator so a seed gives the same image in any batch
    position and on any device: (len(seeds), channels, H/8, W/8)."""
    shape = (channels, 2 * math.ceil(height / (2 * downsample)), 2 * math.ceil(width / (2 * downsample)))
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
             for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


def pack(latents: Tensor) -> Tensor:
    """2x2 patches to tokens: (B, C, H, W) -> (B, H/2 * W/2, C*4), channel order (c, ph, pw) as the reference."""
    B, C, H, W = latents.shape
    x = latents.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(tokens: Tensor, latent_height: int, latent_width: int) -> Tensor:
    """Inverse of pack: (B, H/2 * W/2, C*4) -> (B, C, H, W), sizes in latent pixels."""
    B, _, D = tokens.shape
    h, w = latent_height // 2, latent_width // 2
    x = tokens.view(B, h, w, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, latent_height, latent_width)


def image_ids(batch: int, latent_height: int, latent_width: int, device=None) -> Tensor:
    """Position ids of packed image tokens (B, h*w, 3): axis 0 unused (0), axis 1 row, axis 2 column."""
    h, w = latent_height // 2, latent_width // 2
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(1, h * w, 3).expand(batch, -1, -1)


def text_ids(batch: int, length: int, device=None, numbered: bool = False) -> Tensor:
    """Position ids of text tokens (B, length, 3). FLUX puts them all at 0, so RoPE leaves them unrotated: word
    order must come from the encoder's states, as T5's carry it. `numbered` puts token k at k on axis 0, which
    image tokens leave at 0, so attention also sees the words' order directly (an option of the in-house models,
    whose MiniLM states differ little between a word as subject and as object)."""
    ids = torch.zeros(batch, length, 3, device=device)
    if numbered:
        ids[..., 0] = torch.arange(length, device=device)
    return ids


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def schedule_mu(image_seq_len: int, schedule: ShiftSchedule = FLUX_SHIFT) -> float:
    """The shift for this many image tokens: 0.5 at 256 tokens, 1.15 at 4096 (FLUX.1's schedule)."""
    s = schedule
    slope = (s.max_shift - s.base_shift) / (s.max_seq_len - s.base_seq_len)
    return s.base_shift + slope * (image_seq_len - s.base_seq_len)


def get_schedule(num_steps: int, image_seq_len: int, *, shift: bool = True,
                 schedule: ShiftSchedule = FLUX_SHIFT) -> list[float]:
    """Times from 1 (noise) to 0 (image): linspace(1, 0, N+1), shifted towards noise for larger images."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    timesteps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        mu = schedule_mu(image_seq_len, schedule)
        inner = timesteps[:-1]
        timesteps = torch.cat([time_shift(mu, 1.0, inner), timesteps[-1:]])
    return timesteps.tolist()


@dataclass
class Conditioning:
    """Text conditioning of a batch: token states, their ids and the pooled vector."""

    txt: Tensor
    txt_ids: Tensor
    vec: Tensor

    @classmethod
    def from_encoded(cls, txt: Tensor, vec: Tensor, numbered: bool = False) -> "Conditioning":
        return cls(txt, text_ids(txt.shape[0], txt.shape[1], txt.device, numbered), vec)


@dataclass
class Inpainting:
    """Keep the unmasked region on the trajectory of the source latents (base-model inpainting)."""

    source: Tensor  # clean packed latents of the source image (B, L, 64)
    noise: Tensor  # packed noise (B, L, 64)
    mask: Tensor  # packed mask, 1 = regenerate (B, L, 64)

    def apply(self, img: Tensor, t: float) -> Tensor:
        known = (1 - t) * self.source + t * self.noise
        return self.mask * img + (1 - self.mask) * known


StepCallback = Callable[[int, int, float, Tensor], None]


def denoise(model: Flux, img: Tensor, img_ids: Tensor, cond: Conditioning, timesteps: Sequence[float], *,
            guidance: float | None = None, negative: Conditioning | None = None, true_cfg_scale: float = 1.0,
            inpainting: Inpainting | None = None, callback: StepCallback | None = None,
            progress: bool = False) -> Tensor:
    """Euler integration of dx/dt = v(x, t) along `timesteps` (descending). With `negative`, true classifier-free
    guidance v = v_neg + s * (v_pos - v_neg), both halves in one batched forward."""
    from tqdm.auto import tqdm

    B = img.shape[0]
    use_cfg = negative is not None and true_cfg_scale != 1.0
    guidance_vec = None
    if model.params.guidance_embed:
        guidance_vec = torch.full((B * (2 if use_cfg else 1),), 3.5 if guidance is None else guidance,
                                  device=img.device, dtype=img.dtype)
    if use_cfg:
        txt, txt_ids, vec = (torch.cat(pair) for pair in zip((cond.txt, cond.txt_ids, cond.vec),
                                                              (negative.txt, negative.txt_ids, negative.vec)))
        ids = torch.cat((img_ids, img_ids))
    else:
        txt, txt_ids, vec, ids = cond.txt, cond.txt_ids, cond.vec, img_ids

    steps = list(zip(timesteps[:-1], timesteps[1:]))
    for i, (t_curr, t_prev) in enumerate(tqdm(steps, desc="denoise", disable=not progress, leave=False)):
        x = torch.cat((img, img)) if use_cfg else img
        t_vec = torch.full((x.shape[0],), t_curr, dtype=img.dtype, device=img.device)
        pred = model(img=x, img_ids=ids, txt=txt, txt_ids=txt_ids, timesteps=t_vec, y=vec, guidance=guidance_vec)
        if use_cfg:
            pos, neg = pred.chunk(2)
            pred = neg + true_cfg_scale * (pos - neg)
        # the Euler step in float32, as the reference scheduler, then back to the model dtype
        img = (img.float() + (t_prev - t_curr) * pred.float()).to(img.dtype)
        if inpainting is not None:
            img = inpainting.apply(img, t_prev)
        if callback is not None:
            callback(i, len(steps), t_prev, img)
    return img
