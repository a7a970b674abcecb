"""The speed and memory options as users reach them: Pipeline.from_pretrained(quantize=, offload=, vae_slicing=)
and the CLI flags. The quantized transformer is kept after the first start and loaded (not re-quantized) after;
the image records the scheme and --from-image reapplies it; offload and slicing change no image; bad names are
refused, naming the flag, before anything loads; the memory estimate follows the options."""

import pytest
import torch

from fluxion import cli
from fluxion.errors import InputError
from fluxion.pipeline import Pipeline
from pipeline_fixtures import assert_from_image_reapplies

KW = dict(seed=[1, 2], num_inference_steps=4, output_type="latent")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXION_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_quantized_transformer_is_kept_and_loaded_without_requantizing(home, monkeypatch):
    first = Pipeline.from_pretrained("tiny-dev", quantize="int8")
    kept = list((home / "quantized").glob("*.safetensors"))
    assert len(kept) == 1 and "int8" in kept[0].name and first.quantization == "int8"
    expected = first(["a red circle", "a blue square"], **KW)

    import fluxion.quant

    def refuse(*args, **kwargs):
        raise AssertionError("quantized again")

    monkeypatch.setattr(fluxion.quant, "quantize", refuse)
    again = Pipeline.from_pretrained("tiny-dev", quantize="int8")
    assert torch.equal(again(["a red circle", "a blue square"], **KW), expected)  # the kept file, bit for bit
    plain = Pipeline.from_pretrained("tiny-dev")(["a red circle", "a blue square"], **KW)
    assert not torch.equal(plain, expected)
    assert (plain - expected).norm() / plain.norm() < 0.1


def test_the_image_records_the_scheme_and_from_image_reapplies_it(home, tmp_path):
    assert_from_image_reapplies(tmp_path, "--quantize", "int8-weight")


def test_bad_option_names_are_refused_before_loading(home, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert cli.main(["generate", "a red circle", "--model", "tiny-dev", "--quantize", "int3", "--out", str(out)]) == 2
    assert "quantize (--quantize): expected one of 'int8', 'int8-weight', 'fp8', 'int4'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's own choice check
        cli.main(["generate", "a red circle", "--offload", "disk", "--out", str(out)])
    assert e.value.code == 2 and "--offload: invalid choice: 'disk'" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(InputError, match="offload \\(--offload\\): expected one of 'model', 'sequential'"):
        Pipeline.from_pretrained("no-such-model", offload="disk")


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_and_slicing_change_no_image(home, offload):
    plain = Pipeline.from_pretrained("tiny-dev")
    options = Pipeline.from_pretrained("tiny-dev", offload=offload, vae_slicing=True)
    assert options.offload == offload and options.vae_slicing
    kwargs = dict(seed=[1, 2], num_inference_steps=4, output_type="pt")
    pixels = options(["a red circle", "a blue square"], **kwargs)
    latents = plain(["a red circle", "a blue square"], **{**kwargs, "output_type": "latent"})
    assert torch.equal(latents, options(["a red circle", "a blue square"], **{**kwargs, "output_type": "latent"}))
    one_by_one = torch.cat([plain.decode(latents[i:i + 1]) for i in range(2)])  # what slicing does
    assert torch.equal(pixels, one_by_one)


def test_memory_estimate_follows_the_options(home):
    from fluxion.memory import estimate_memory

    pipe = Pipeline.from_pretrained("tiny-dev")
    args = (pipe.transformer, pipe.autoencoder, pipe.text_encoder)
    kw = dict(height=512, width=512, batch=4, text_tokens=24)
    plain = estimate_memory(*args, **kw)
    assert estimate_memory(*args, **kw, offload="model").weights < plain.weights
    assert estimate_memory(*args, **kw, offload="sequential").weights < estimate_memory(*args, **kw,
                                                                                      offload="model").weights
    assert estimate_memory(*args, **kw, sliced=True).vae < plain.vae / 2
    quantized = Pipeline.from_pretrained("tiny-dev", quantize="int8")
    assert estimate_memory(quantized.transformer, quantized.autoencoder, **kw).weights < \
        estimate_memory(pipe.transformer, pipe.autoencoder, **kw).weights
    from fluxion.memory import quantized_working_bytes

    linears = [m for m in quantized.transformer.modules() if getattr(m, "qweight", None) is not None]
    # int8 on the CPU: fbgemm's packed copy, one byte per quantized weight
    assert quantized_working_bytes(quantized.transformer, "cpu") == sum(m.qweight.numel() for m in linears)
