"""Hyper-parameters of the FLUX transformer and autoencoder, with named presets in one table each."""

from dataclasses import dataclass, field


@dataclass
class FluxParams:
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {head_dim}")


@dataclass
class AutoEncoderParams:
    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


TRANSFORMER_PRESETS: dict[str, FluxParams] = {
    "flux-dev": FluxParams(guidance_embed=True),
    "flux-schnell": FluxParams(guidance_embed=False),
    # Every code path in seconds: used by tests.
    "debug": FluxParams(vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=2, depth=2,
                        depth_single_blocks=2, axes_dim=[4, 14, 14], guidance_embed=True),
    # The in-house miniature family (text from MiniLM: 384-d token states and pooled vector); 7.2M parameters,
    # 14.3 MB as the shipped bf16.
    "tiny-pro": FluxParams(vec_in_dim=384, context_in_dim=384, hidden_size=192, num_heads=3, depth=3,
                           depth_single_blocks=5, axes_dim=[8, 28, 28], guidance_embed=False),
    "tiny-dev": FluxParams(vec_in_dim=384, context_in_dim=384, hidden_size=192, num_heads=3, depth=3,
                           depth_single_blocks=5, axes_dim=[8, 28, 28], guidance_embed=True),
    "tiny-schnell": FluxParams(vec_in_dim=384, context_in_dim=384, hidden_size=192, num_heads=3, depth=3,
                               depth_single_blocks=5, axes_dim=[8, 28, 28], guidance_embed=False),
}

AUTOENCODER_PRESETS: dict[str, AutoEncoderParams] = {
    "flux": AutoEncoderParams(),
    "debug": AutoEncoderParams(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1),
    "tiny": AutoEncoderParams(resolution=64, ch=32, ch_mult=[1, 2, 2, 4], num_res_blocks=1),
}
