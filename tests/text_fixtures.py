"""Tiny real T5 and CLIP text encoders built offline, in the folder layout of a diffusers FLUX pipeline."""

import io
import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

# Folder names inside a diffusers FLUX checkpoint (model_index.json's components).
CLIP_MODEL, CLIP_TOKENIZER = "text_encoder", "tokenizer"
T5_MODEL, T5_TOKENIZER = "text_encoder_2", "tokenizer_2"

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "pink", "cyan", "brown"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "cross", "ellipse", "rectangle"]
RELATIONS = ["left of", "right of", "above", "below", "next to", "on top of"]
SIZES = ["small", "large", "big", "tiny"]
PUNCTUATION = list(",.;:!?'\"-()")

# The regex and normalizer of transformers' CLIPTokenizer (the same split as OpenAI's CLIP BPE).
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"

_BUILT: dict[Path, dict[str, Path]] = {}


def caption(rng: random.Random) -> str:
    """One shapes-world-like caption: 'a small red circle left of two blue squares'."""
    def obj() -> str:
        count = rng.choice(["a", "one", "two", "three"])
        size = rng.choice(SIZES + [""])
        shape = rng.choice(SHAPES) + ("s" if count not in ("a", "one") else "")
        return " ".join(w for w in (count, size, rng.choice(COLORS), shape) if w)

    return f"{obj()} {rng.choice(RELATIONS)} {obj()}"


def corpus(seed: int = 0, n_captions: int = 1500, n_noise: int = 600) -> list[str]:
    """Training text: captions plus random words, digits and punctuation so every character is covered."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lines = [caption(rng) for _ in range(n_captions)]
    for _ in range(n_noise):
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(rng.randint(3, 10))]
        words += [str(rng.randint(0, 999)), rng.choice(PUNCTUATION)]
        rng.shuffle(words)
        lines.append(" ".join(words).capitalize() if rng.random() < 0.3 else " ".join(words))
    return lines


def make_tiny_t5(model_dir: str | Path, tokenizer_dir: str | Path | None = None, *, vocab_size: int = 300,
                 seed: int = 0) -> None:
    """A SentencePiece-unigram T5 tokenizer and a random 2-layer T5 v1.1 encoder, saved as safetensors."""
    model_dir = Path(model_dir)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    # T5's special-token layout: <pad>=0, </s>=1, <unk>=2, no <s>.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(seed)), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    (tokenizer_dir / "spiece.model").write_bytes(model.getvalue())
    # Loading the folder converts spiece.model into a tokenizers Unigram (with 100 <extra_id_N> sentinels, as T5);
    # saving writes tokenizer.json next to spiece.model, the layout of FLUX's tokenizer_2/.
    tokenizer = T5Tokenizer.from_pretrained(tokenizer_dir, model_max_length=512, local_files_only=True)
    tokenizer.save_pretrained(tokenizer_dir)

    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = T5EncoderModel(config).eval()
    encoder.save_pretrained(model_dir, safe_serialization=True)


def _clip_bpe(lines: list[str], n_merges: int) -> tuple[dict[str, int], list[str]]:
    """Byte-level BPE merges trained with CLIP's split; the vocabulary in CLIP's order: bytes, bytes</w>, merges,
    specials."""
    trainer_tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    trainer_tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(vocab_size=2 * len(alphabet) + n_merges, initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False)
    trainer_tok.train_from_iterator(lines, trainer)
    merges = [tuple(m) for m in json.loads(trainer_tok.to_str())["model"]["merges"]][:n_merges]

    tokens = alphabet + [b + "</w>" for b in alphabet] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, [" ".join(m) for m in merges]


def make_tiny_clip(model_dir: str | Path, tokenizer_dir: str | Path | None = None, *, n_merges: int = 200,
                   seed: int = 0) -> None:
    """A byte-level BPE CLIP tokenizer (vocab.json + merges.txt) and a random 2-layer CLIPTextModel, saved."""
    model_dir = Path(model_dir)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_bpe(corpus(seed), n_merges)
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # FLUX's CLIP tokenizer pads with <|endoftext|> to 77 tokens.
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77, pad_token=CLIP_EOS,
                                              local_files_only=True)
    tokenizer.save_pretrained(tokenizer_dir)

    # eos_token_id is the real id (not the legacy 2), so CLIPTextModel pools at the first <|endoftext|>.
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config).eval()
    model.save_pretrained(model_dir, safe_serialization=True)


def make_tiny_text_encoders(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Build both encoders under root as diffusers names them; cached per process and root folder."""
    root = Path(root).resolve()
    if root not in _BUILT:
        paths = {name: root / name for name in (CLIP_MODEL, CLIP_TOKENIZER, T5_MODEL, T5_TOKENIZER)}
        make_tiny_clip(paths[CLIP_MODEL], paths[CLIP_TOKENIZER], seed=seed)
        make_tiny_t5(paths[T5_MODEL], paths[T5_TOKENIZER], seed=seed)
        _BUILT[root] = paths
    return dict(_BUILT[root])


@pytest.fixture(scope="session")
def tiny_text_encoders(tmp_path_factory) -> dict[str, Path]:
    """Session fixture: {'text_encoder', 'tokenizer', 'text_encoder_2', 'tokenizer_2'} -> folders.

    Use it from another test module with `from text_fixtures import tiny_text_encoders`.
    """
    return make_tiny_text_encoders(tmp_path_factory.getbasetemp() / "tiny_text_encoders")
