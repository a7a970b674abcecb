"""The FLUX.1 MM-DiT: double-stream blocks, then single-stream blocks, conditioned by adaLN on t, y and guidance."""

import torch
from torch import Tensor, nn

from .configs import FluxParams
from .layers import DoubleStreamBlock, EmbedND, LastLayer, MLPEmbedder, SingleStreamBlock, timestep_embedding


class Flux(nn.Module):
    """Flow-matching transformer over packed latent tokens; attribute names are the BFL checkpoint keys."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(params.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, self.hidden_size)
        self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """img (B, L_img, in_channels), txt (B, L_txt, context_in_dim), ids (B, L, 3), timesteps (B,) in [0, 1],
        y (B, vec_in_dim), guidance (B,) -> predicted velocity (B, L_img, out_channels)."""
        img, txt, vec, pe = self.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        return self.final_layer(self.single_stream(img, txt, vec, pe), vec)

    def embed(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
              guidance: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The inputs projected to the hidden size, the conditioning vector and the RoPE of all positions."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (batch, tokens, channels); got {tuple(img.shape)} and "
                             f"{tuple(txt.shape)}")
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this model embeds distilled guidance: pass `guidance` (B,), e.g. 3.5")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)

        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        return img, txt, vec, pe

    def single_stream(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        """The single-stream blocks over the joint sequence; returns its image tokens."""
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec=vec, pe=pe)
        return x[:, txt.shape[1] :, ...]

    @torch.no_grad()
    def initialize_weights(self) -> "Flux":
        """Initialisation for training from scratch (DiT): Xavier linears, adaLN-Zero modulation and output, so
        every block starts as the identity and the first prediction is zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for name, module in self.named_modules():
            if name.endswith(("_mod.lin", "modulation.lin")) or name.startswith("final_layer"):
                if isinstance(module, nn.Linear):
                    nn.init.zeros_(module.weight)
                    nn.init.zeros_(module.bias)
        for embedder in (self.time_in, self.guidance_in):
            if isinstance(embedder, MLPEmbedder):
                nn.init.normal_(embedder.in_layer.weight, std=0.02)
                nn.init.normal_(embedder.out_layer.weight, std=0.02)
        return self
