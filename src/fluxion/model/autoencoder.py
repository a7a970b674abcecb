"""The FLUX autoencoder: 16-channel latents, 8x down-sampling; encode = scale*(mean-shift), decode = z/scale+shift."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import AutoEncoderParams


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections (as the BFL checkpoint stores them)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = _group_norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        # (B, C, H, W) -> (B, 1, H*W, C); contiguous, or the CPU kernel falls back to materialising the
        # (H*W)^2 score matrix (1 GiB for a 1024x1024 decode, and 5x slower)
        q, k, v = (proj(h).flatten(2).transpose(1, 2).contiguous()[:, None] for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h[:, 0].transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # asymmetric padding (right and bottom only), as the original LDM autoencoder
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.num_resolutions = len(p.ch_mult)
        self.num_res_blocks = p.num_res_blocks
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *p.ch_mult)
        self.down = nn.ModuleList()
        block_in = p.ch
        for i_level in range(self.num_resolutions):
            block_in = p.ch * in_ch_mult[i_level]
            block_out = p.ch * p.ch_mult[i_level]
            blocks = nn.ModuleList()
            for _ in range(p.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            down = nn.Module()
            down.block = blocks
            down.attn = nn.ModuleList()  # empty in FLUX; kept so module paths match the checkpoint
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = _mid(block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> mean and log-variance (B, 2*z, H/f, W/f)."""
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for block in down.block:
                h = block(h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.num_resolutions = len(p.ch_mult)
        self.num_res_blocks = p.num_res_blocks
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid(block_in)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block_out = p.ch * p.ch_mult[i_level]
            blocks = nn.ModuleList()
            for _ in range(p.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            up = nn.Module()
            up.block = blocks
            up.attn = nn.ModuleList()
            if i_level != 0:
                up.upsample = Upsample(block_in)
            self.up.insert(0, up)  # up[0] is the highest resolution, as in the checkpoint
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            for block in self.up[i_level].block:
                h = block(h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    @property
    def downsample_factor(self) -> int:
        return self.params.downsample_factor

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw posterior (mean, logvar) before scaling: used by VAE training."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar

    def encode(self, x: Tensor) -> Tensor:
        """Image in [-1, 1] (B, 3, H, W) -> normalised latents (B, z, H/8, W/8) from the posterior mean."""
        mean, _ = self.encode_moments(x)
        return self.scale_factor * (mean - self.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z / self.scale_factor + self.shift_factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def encode_tiled(self, x: Tensor, tile: int = 512, overlap: int = 64) -> Tensor:
        """Encode overlapping pixel tiles and blend them in latent space, for images too large for one pass."""
        f = self.downsample_factor
        return blend_tiles(x, self.encode, tile, overlap, scale=1 / f, out_channels=self.params.z_channels)

    def decode_tiled(self, z: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
        """Decode overlapping latent tiles (sizes in latent pixels) and blend them with linear ramps: no seams."""
        f = self.downsample_factor
        return blend_tiles(z, self.decode, tile, overlap, scale=f, out_channels=self.params.out_ch)


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool, device, dtype) -> Tensor:
    """1-D blending weight: rises over `overlap` at a shared start edge and falls at a shared end edge."""
    w = torch.ones(length, device=device, dtype=dtype)
    n = min(overlap, length)
    if n > 0:
        ramp = (torch.arange(n, device=device, dtype=dtype) + 0.5) / n
        if at_start:
            w[:n] = torch.minimum(w[:n], ramp)
        if at_end:
            w[-n:] = torch.minimum(w[-n:], ramp.flip(0))
    return w


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def blend_tiles(x: Tensor, fn, tile: int, overlap: int, scale: float, out_channels: int) -> Tensor:
    """Apply fn to overlapping tiles of x (B, C, H, W) and blend the outputs (scaled by `scale`) with ramps."""
    if overlap >= tile:
        raise ValueError(f"tile overlap {overlap} must be smaller than the tile size {tile}")
    B, _, H, W = x.shape
    out_h, out_w = round(H * scale), round(W * scale)
    out = torch.zeros(B, out_channels, out_h, out_w, device=x.device, dtype=torch.float32)
    weight = torch.zeros(1, 1, out_h, out_w, device=x.device, dtype=torch.float32)
    ys, xs = _tile_starts(H, tile, overlap), _tile_starts(W, tile, overlap)
    for y0 in ys:
        for x0 in xs:
            piece = fn(x[:, :, y0 : y0 + tile, x0 : x0 + tile]).float()
            oy, ox = round(y0 * scale), round(x0 * scale)
            ph, pw = piece.shape[-2:]
            o = round(overlap * scale)
            wy = _ramp(ph, o, y0 > 0, y0 + tile < H, x.device, torch.float32)
            wx = _ramp(pw, o, x0 > 0, x0 + tile < W, x.device, torch.float32)
            w = wy[:, None] * wx[None, :]
            out[:, :, oy : oy + ph, ox : ox + pw] += piece * w
            weight[:, :, oy : oy + ph, ox : ox + pw] += w
    return (out / weight).to(x.dtype)
