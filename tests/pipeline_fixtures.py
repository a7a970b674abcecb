"""Small random pipelines for tests: debug-size transformer and VAE, and a deterministic toy text encoder."""

import hashlib

import torch

from fluxion.checkpoints import export_diffusers
from fluxion.model import AUTOENCODER_PRESETS, TRANSFORMER_PRESETS, AutoEncoder, Flux, FluxParams
from fluxion.pipeline import Pipeline


class ToyTextEncoder:
    """Maps each prompt to fixed random states seeded by its hash: distinct prompts, distinct conditioning."""

    context_dim = vec_dim = 32
    max_length = 8

    def encode(self, prompts):
        txt, vec = [], []
        for p in prompts:
            g = torch.Generator().manual_seed(int(hashlib.sha256(p.encode()).hexdigest()[:8], 16))
            txt.append(torch.randn(self.max_length, self.context_dim, generator=g))
            vec.append(torch.randn(self.vec_dim, generator=g))
        return torch.stack(txt), torch.stack(vec)

    def to(self, device=None, dtype=None):
        return self


def random_weights(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            # norm scales around 1, as trained models have them; everything else small and centred
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if name.endswith(".scale") else 0.0))
    return module


def make_pipeline(variant: str = "dev", guidance_embed: bool | None = None) -> Pipeline:
    torch.manual_seed(0)
    params = TRANSFORMER_PRESETS["debug"]
    if guidance_embed is None:
        guidance_embed = variant == "dev"
    params = type(params)(**{**params.__dict__, "guidance_embed": guidance_embed})
    transformer = random_weights(Flux(params), seed=1)
    autoencoder = random_weights(AutoEncoder(AUTOENCODER_PRESETS["debug"]), seed=2, std=0.02)
    defaults = {"size": 64, "num_inference_steps": 3}
    return Pipeline(transformer, autoencoder, ToyTextEncoder(), variant=variant, name=f"debug-{variant}",
                    defaults=defaults, device="cpu", dtype=torch.float32)


def save_diffusers_flux(root, encoders, guidance_embed: bool, dynamic_shift: bool):
    """Save a diffusers FLUX folder built from our random weights; return diffusers' FluxPipeline loaded from it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    params = FluxParams(**{**TRANSFORMER_PRESETS["debug"].__dict__, "guidance_embed": guidance_embed})
    transformer = random_weights(Flux(params), seed=11)
    ae_params = AUTOENCODER_PRESETS["debug"]
    autoencoder = random_weights(AutoEncoder(ae_params), seed=12, std=0.02)
    export_diffusers(transformer.state_dict(), params, root / "transformer", "transformer")
    export_diffusers(autoencoder.state_dict(), ae_params, root / "vae", "vae")
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=dynamic_shift, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=AutoencoderKL.from_pretrained(root / "vae"),
        transformer=FluxTransformer2DModel.from_pretrained(root / "transformer"),
        text_encoder=CLIPTextModel.from_pretrained(encoders["text_encoder"]),
        tokenizer=CLIPTokenizer.from_pretrained(encoders["tokenizer"]),
        text_encoder_2=T5EncoderModel.from_pretrained(encoders["text_encoder_2"]),
        tokenizer_2=T5TokenizerFast.from_pretrained(encoders["tokenizer_2"]),
    )
    pipe.save_pretrained(root)
    return pipe


def assert_from_image_reapplies(tmp_path, flag: str, value: str, steps: int = 4) -> None:
    """`fluxion generate ... FLAG VALUE` records the setting in its PNG, and --from-image redraws the same image
    with it (the attribute of GenerationSettings is the flag's name)."""
    from PIL import Image

    from fluxion import cli
    from fluxion.metadata import read_settings

    out, again = tmp_path / "a.png", tmp_path / "b.png"
    assert cli.main(["generate", "two yellow stars", "--model", "tiny-dev", "--steps", str(steps), "--seed", "1",
                     flag, value, "--out", str(out)]) == 0
    assert getattr(read_settings(out), flag.lstrip("-")) == value
    assert cli.main(["generate", "--from-image", str(out), "--out", str(again)]) == 0
    assert getattr(read_settings(again), flag.lstrip("-")) == value
    assert Image.open(again).tobytes() == Image.open(out).tobytes()
