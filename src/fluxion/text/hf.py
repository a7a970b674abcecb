"""T5 and CLIP text encoders as the FLUX reference's HFEmbedder, loaded offline from local safetensors folders."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fluxion.errors import InputError, ModelNotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Files a folder must hold, as alternatives: one whole tuple must be present.
MODEL_FILES = (("config.json", "model.safetensors"), ("config.json", "model.safetensors.index.json"))
TOKENIZER_FILES = {
    "T5": (("tokenizer.json",), ("spiece.model",)),
    "CLIP": (("tokenizer.json",), ("vocab.json", "merges.txt")),
}
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt", "model.pt")

# Sub-folders of a diffusers FLUX checkpoint (model_index.json): CLIP is text_encoder, T5 is text_encoder_2.
DIFFUSERS_LAYOUT = {
    "clip": ("text_encoder", "tokenizer"),
    "t5": ("text_encoder_2", "tokenizer_2"),
}


def check_prompts(prompts: list[str]) -> list[str]:
    """Reject a bare string or an empty batch before they reach a tokenizer (which would accept both)."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise InputError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise InputError("prompts must hold at least one prompt, got an empty list")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise InputError(f"prompts[{bad[0]}] must be a string, got {type(prompts[bad[0]]).__name__}")
    return list(prompts)


def tokenize(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int, name: str):
    """Pad/truncate to max_length exactly as FLUX and diffusers do; warn about every prompt that loses tokens."""
    batch = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_length=False,
        return_overflowing_tokens=False,
        return_tensors="pt",
    )
    # verbose=False: the full-length pass would otherwise trigger the tokenizer's own model_max_length warning.
    full = tokenizer(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
    for i, ids in enumerate(full):
        if len(ids) > max_length:
            # All three tokenizers (T5, CLIP, BERT) end a sequence with one special token, kept after truncation,
            # so the dropped text is ids[max_length - 1 : -1].
            dropped = tokenizer.decode(ids[max_length - 1:], skip_special_tokens=True)
            if len(dropped) > 200:
                dropped = dropped[:200] + "..."
            log.warning(
                "%s: prompt %d has %d tokens, over max_length=%d; %d tokens dropped: %r",
                name, i, len(ids), max_length, len(ids) - max_length, dropped,
            )
    return batch


class HFEmbedder(nn.Module):
    """A frozen Hugging Face text model and its tokenizer; forward(prompts) -> last_hidden_state or pooler_output."""

    def __init__(self, hf_module: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 output_key: str, dim: int, name: str):
        super().__init__()
        self.hf_module = hf_module.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.output_key = output_key
        self.dim = dim
        self.name = name

    @property
    def device(self) -> torch.device:
        return next(self.hf_module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_module.parameters()).dtype

    def tokenize(self, prompts: list[str]) -> Tensor:
        """(B,) prompts -> (B, max_length) input ids."""
        return tokenize(self.tokenizer, check_prompts(prompts), self.max_length, self.name)["input_ids"]

    def forward(self, prompts: list[str]) -> Tensor:
        """T5: (B, max_length, d_model) states; CLIP: (B, hidden) pooled, in the module's dtype and device."""
        input_ids = self.tokenize(prompts)
        with torch.inference_mode():
            # No attention mask, as in BFL's conditioner and diffusers' FluxPipeline: FLUX was trained on T5 states
            # of the padding positions too.
            out = self.hf_module(input_ids=input_ids.to(self.device), attention_mask=None,
                                 output_hidden_states=False)
            out = out[self.output_key]
        # Inference tensors cannot be saved for backward; a plain copy lets training feed them to a model.
        return out.clone()


class FluxTextEncoder(nn.Module):
    """FLUX conditioning: T5 states as the sequence (txt), CLIP pooled output as the vector (vec)."""

    def __init__(self, t5: HFEmbedder, clip: HFEmbedder):
        super().__init__()
        self.t5 = t5
        self.clip = clip

    @property
    def context_dim(self) -> int:
        return self.t5.dim

    @property
    def vec_dim(self) -> int:
        return self.clip.dim

    @property
    def max_length(self) -> int:
        return self.t5.max_length

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(B,) prompts -> txt (B, L, context_dim), vec (B, vec_dim)."""
        prompts = check_prompts(prompts)
        return self.t5(prompts), self.clip(prompts)

    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        return self.encode(prompts)


def require_files(folder: Path, alternatives: tuple[tuple[str, ...], ...], what: str, argument: str) -> None:
    """Raise ModelNotFoundError unless folder holds one complete set of files."""
    if not folder.is_dir():
        raise ModelNotFoundError(f"{argument}: {what} folder {folder} does not exist")
    if any(all((folder / f).is_file() for f in files) for files in alternatives):
        return
    expected = " or ".join(" + ".join(files) for files in alternatives)
    pickles = [f for f in PICKLE_FILES if (folder / f).is_file()]
    hint = (f"; found {', '.join(pickles)}, but fluxion loads safetensors only (pickles can run code): "
            "convert it to model.safetensors") if pickles else ""
    raise ModelNotFoundError(f"{argument}: {what} folder {folder} lacks the expected files ({expected}){hint}")


def _load_embedder(kind: str, model_dir: str | Path, tokenizer_dir: str | Path | None, max_length: int,
                   dtype: torch.dtype | None, device: torch.device | str | None) -> HFEmbedder:
    # transformers is imported here, not at module level: it takes seconds, and `import fluxion` should not.
    import transformers

    model_cls, tokenizer_cls, output_key = {
        "T5": (transformers.T5EncoderModel, transformers.T5TokenizerFast, "last_hidden_state"),
        "CLIP": (transformers.CLIPTextModel, transformers.CLIPTokenizer, "pooler_output"),
    }[kind]
    if max_length < 1:
        raise InputError(f"max_length must be positive for {kind}, got {max_length}")
    model_dir = Path(model_dir)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    require_files(model_dir, MODEL_FILES, f"{kind} text encoder", "model_dir")
    require_files(tokenizer_dir, TOKENIZER_FILES[kind], f"{kind} tokenizer", "tokenizer_dir")

    tokenizer = tokenizer_cls.from_pretrained(tokenizer_dir, local_files_only=True)
    model = model_cls.from_pretrained(model_dir, local_files_only=True, use_safetensors=True,
                                      dtype=dtype if dtype is not None else "auto")
    config = model.config
    if kind == "CLIP" and max_length > config.max_position_embeddings:
        raise InputError(f"max_length={max_length} exceeds the CLIP model's "
                         f"max_position_embeddings={config.max_position_embeddings} ({model_dir})")
    dim = config.d_model if kind == "T5" else config.hidden_size
    return HFEmbedder(model, tokenizer, max_length, output_key, dim, kind).to(device=device)


def load_t5(model_dir: str | Path, tokenizer_dir: str | Path | None = None, max_length: int = 512,
            dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> HFEmbedder:
    """T5 encoder (T5EncoderModel + T5 tokenizer): 512 tokens for FLUX.1-dev, 256 for schnell.

    dtype None keeps the checkpoint's stored dtype; tokenizer_dir defaults to model_dir.
    """
    return _load_embedder("T5", model_dir, tokenizer_dir, max_length, dtype, device)


def load_clip(model_dir: str | Path, tokenizer_dir: str | Path | None = None, max_length: int = 77,
              dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> HFEmbedder:
    """CLIP-L text encoder (CLIPTextModel + CLIPTokenizer), pooled output."""
    return _load_embedder("CLIP", model_dir, tokenizer_dir, max_length, dtype, device)


def load_flux_text_encoder(root: str | Path, t5_max_length: int = 512, dtype: torch.dtype | None = None,
                           device: torch.device | str | None = None) -> FluxTextEncoder:
    """T5 + CLIP from a diffusers FLUX folder (text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/)."""
    root = Path(root)
    t5_model, t5_tok = DIFFUSERS_LAYOUT["t5"]
    clip_model, clip_tok = DIFFUSERS_LAYOUT["clip"]
    t5 = load_t5(root / t5_model, root / t5_tok, max_length=t5_max_length, dtype=dtype, device=device)
    clip = load_clip(root / clip_model, root / clip_tok, dtype=dtype, device=device)
    return FluxTextEncoder(t5, clip)
