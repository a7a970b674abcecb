"""BERT encoder (as in all-MiniLM-L6-v2) in plain PyTorch, loading Hugging Face BertModel safetensors by a key table."""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from fluxion.errors import CheckpointError, InputError

# Only what this module implements: absolute positions, exact-erf GELU ("gelu" in transformers' ACT2FN).
SUPPORTED_CONFIG = {"hidden_act": "gelu", "position_embedding_type": "absolute"}


@dataclass
class BertConfig:
    """The config.json fields the encoder needs (names as in transformers' BertConfig)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read the BERT config: {e}") from e
        for key, value in SUPPORTED_CONFIG.items():
            if raw.get(key, value) != value:
                raise CheckpointError(f"{path}: {key} must be {value!r} for fluxion's BERT, got {raw[key]!r}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.name not in raw]
        if required:
            raise CheckpointError(f"{path}: missing BERT config key(s) {', '.join(required)}")
        config = cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        if config.hidden_size % config.num_attention_heads:
            raise CheckpointError(f"{path}: hidden_size={config.hidden_size} is not divisible by "
                                  f"num_attention_heads={config.num_attention_heads}")
        return config


def _embedding(num: int, dim: int) -> nn.Embedding:
    # Zeros, not nn.Embedding's normal_ init: on the meta device (load_bert) normal_ imports torch._dynamo, ~2 s in
    # torch 2.13. The module only ever holds loaded weights.
    return nn.Embedding.from_pretrained(torch.zeros(num, dim), freeze=False)


class BertLayer(nn.Module):
    """Post-LayerNorm transformer layer: x = LN(x + attn(x)), then x = LN(x + FFN(x))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.attn_out = nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn_in = nn.Linear(dim, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B, L, D = x.shape
        # (B, L, D) -> (B, heads, L, D / heads)
        q, k, v = (p(x).view(B, L, self.num_heads, -1).transpose(1, 2) for p in (self.query, self.key, self.value))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L, D)
        x = self.attn_norm(x + self.attn_out(a))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))  # BERT's "gelu" is the exact erf form


class Bert(nn.Module):
    """BERT's encoder without the pooler: ids -> last hidden states."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.word_embeddings = _embedding(config.vocab_size, dim)
        self.position_embeddings = _embedding(config.max_position_embeddings, dim)
        self.token_type_embeddings = _embedding(config.type_vocab_size, dim)
        self.embed_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        """(B, L) ids, mask (1 token, 0 padding) and segment ids (default 0) -> (B, L, hidden_size) states."""
        B, L = input_ids.shape
        if L > self.config.max_position_embeddings:
            raise InputError(f"input_ids has {L} tokens, over max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(L, device=input_ids.device)
        # Summed in transformers' order (words + segments, then positions): float addition is not associative.
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = self.embed_norm(x + self.position_embeddings(positions))
        # (B, L) -> (B, 1, 1, L) boolean: queries attend to real tokens only ([CLS] is always one, so no row is empty).
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x


# transformers' BertModel keys (module paths; ".weight"/".bias" follow) -> ours. "{i}" is the layer index.
HF_KEYMAP = {
    "embeddings.word_embeddings": "word_embeddings",
    "embeddings.position_embeddings": "position_embeddings",
    "embeddings.token_type_embeddings": "token_type_embeddings",
    "embeddings.LayerNorm": "embed_norm",
    "encoder.layer.{i}.attention.self.query": "layers.{i}.query",
    "encoder.layer.{i}.attention.self.key": "layers.{i}.key",
    "encoder.layer.{i}.attention.self.value": "layers.{i}.value",
    "encoder.layer.{i}.attention.output.dense": "layers.{i}.attn_out",
    "encoder.layer.{i}.attention.output.LayerNorm": "layers.{i}.attn_norm",
    "encoder.layer.{i}.intermediate.dense": "layers.{i}.ffn_in",
    "encoder.layer.{i}.output.dense": "layers.{i}.ffn_out",
    "encoder.layer.{i}.output.LayerNorm": "layers.{i}.ffn_norm",
}
# Not loaded: position_ids is the constant arange buffer; the pooler (tanh on [CLS]) is unused by sentence embeddings.
HF_SKIPPED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.")


def from_hf_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename BertModel keys to Bert's; unknown keys pass through unchanged, for the loader to report."""
    out = {}
    for key, t in state_dict.items():
        if key in HF_SKIPPED:
            continue
        module, _, param = key.rpartition(".")
        m = _LAYER.match(module)
        ours = HF_KEYMAP.get(f"encoder.layer.{{i}}.{module[m.end():]}" if m else module)
        if ours is None:
            out[key] = t
        else:
            out[f"{ours.format(i=m[1] if m else '')}.{param}"] = t
    return out


def load_bert(model_dir: str | Path, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> Bert:
    """Bert from a transformers BertModel folder (config.json + model.safetensors), frozen, in eval mode.

    dtype None keeps the stored dtype. The weights are assigned as read, not copied into initialised parameters.
    """
    # Imported here: fluxion.checkpoints pulls in the model package, which `import fluxion.text` does not need.
    from fluxion.checkpoints.io import load_into

    model_dir = Path(model_dir)
    config = BertConfig.from_json(model_dir / "config.json")
    with torch.device("meta"):  # shapes only: an initialisation would be thrown away
        model = Bert(config)
    path = model_dir / "model.safetensors"
    state_dict = {}
    try:
        # safetensors' default mmap reader, not fluxion.checkpoints' copying one: the CPU tensors share the file's
        # pages, so loading takes milliseconds and only the rows of the 30k-word table a prompt uses are read.
        with safe_open(path, framework="pt", device=str(device) if device is not None else "cpu") as f:
            for key in f.keys():
                if key not in HF_SKIPPED:
                    t = f.get_tensor(key)
                    state_dict[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: safetensors could not read the file: {e}") from e
    load_into(model, from_hf_state_dict(state_dict), source=str(path))
    return model.eval().requires_grad_(False)
