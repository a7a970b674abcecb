"""Load the transformer or autoencoder from a BFL file or a diffusers folder; export and convert between layouts."""

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..errors import CheckpointError, ModelNotFoundError
from ..files import atomic_folder, write_json
from ..model.autoencoder import AutoEncoder
from ..model.configs import AUTOENCODER_PRESETS, TRANSFORMER_PRESETS, AutoEncoderParams, FluxParams
from ..model.transformer import Flux
from .detect import (Component, detect_autoencoder_params, detect_layout, detect_transformer_params, diffusers_config,
                     find_prefix, params_from_diffusers_config, params_metadata, strip_prefix)
from .io import CheckpointInfo, load_into, load_state_dict, read_checkpoint_info, save_state_dict
from .keymaps import KEYMAPS, Layout, convert_state_dict

logger = logging.getLogger(__name__)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_SUBFOLDER = {"transformer": "transformer", "autoencoder": "vae"}


@contextmanager
def naming(source):
    """Put the file's name in front of a CheckpointError raised by shape-only code that never saw it."""
    try:
        yield
    except CheckpointError as e:
        if str(source) in str(e):
            raise
        raise CheckpointError(f"{source}: {e}") from None


@dataclass
class CheckpointSource:
    """A component's weights on disk: one file, or a diffusers folder (config.json, possibly sharded weights)."""

    label: str  # for messages: the file or folder
    files: list[Path]
    infos: list[CheckpointInfo]
    config: dict | None  # diffusers config.json, if any
    component: Component
    layout: Layout
    prefix: str  # all-in-one prefix of the component's keys ('' if none)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for info in self.infos:
            shapes.update(strip_prefix(info.shapes, self.prefix))
        return shapes

    @property
    def metadata(self) -> dict[str, str]:
        return {k: v for info in self.infos for k, v in info.metadata.items()}

    def params(self) -> FluxParams | AutoEncoderParams:
        if self.config is not None:
            return params_from_diffusers_config(self.config, source=f"{self.label}/config.json")
        with naming(self.label):
            if self.component == "transformer":
                return detect_transformer_params(self.shapes, self.metadata)
            return detect_autoencoder_params(self.shapes, self.metadata)

    def state_dict(self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """All tensors, prefix-free, in this source's own layout."""
        sd: dict[str, Tensor] = {}
        for path in self.files:
            part = strip_prefix(load_state_dict(path, dtype=dtype, device=device, prefix=self.prefix), self.prefix)
            repeated = part.keys() & sd.keys()
            if repeated:
                raise CheckpointError(f"{path} repeats keys found in another shard of {self.label}: "
                                      f"{', '.join(sorted(repeated)[:5])}")
            sd.update(part)
        return sd


def _diffusers_files(folder: Path) -> list[Path]:
    index = folder / DIFFUSERS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid shard index (needs a 'weight_map' object): {e}") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} lists shards that are not in {folder}: {', '.join(absent)}")
        return files
    if (folder / DIFFUSERS_WEIGHTS).is_file():
        return [folder / DIFFUSERS_WEIGHTS]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if not found:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
        hint = f" (it has {', '.join(pickles)}: pickle files are refused; convert them to safetensors)" \
            if pickles else ""
        raise CheckpointError(f"no .safetensors weights in {folder}{hint}")
    raise CheckpointError(f"{folder} holds several .safetensors files and no {DIFFUSERS_INDEX}: "
                          f"{', '.join(p.name for p in found)}; pass the file to load")


def open_checkpoint(path: str | os.PathLike, component: Component | None = None) -> CheckpointSource:
    """Resolve a file or folder to its weights and tell which component and layout they are (headers only)."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"checkpoint {path} does not exist")
    config = None
    if path.is_dir():
        if not (path / "config.json").is_file():
            subs = [_SUBFOLDER[component]] if component else list(_SUBFOLDER.values())
            found = [path / s for s in subs if (path / s).is_dir()]
            if len(found) != 1:
                raise CheckpointError(f"{path} is a folder without config.json; point to the component folder "
                                      f"(e.g. {path / subs[0]}) or a .safetensors file")
            path = found[0]
        config_path = path / "config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e
            if not isinstance(config, dict):
                raise CheckpointError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
        files = _diffusers_files(path)
    else:
        files = [path]
    infos = [read_checkpoint_info(f) for f in files]
    keys = [k for info in infos for k in info.tensors]
    prefix = ""
    for candidate in (component,) if component else ("transformer", "autoencoder"):
        prefix = find_prefix(keys, candidate)
        if prefix:
            break
    with naming(path):
        detected, layout = detect_layout(k[len(prefix):] for k in keys if k.startswith(prefix))
    if component and detected != component:
        raise CheckpointError(f"{path} holds {detected} weights, not {component} weights")
    return CheckpointSource(label=str(path), files=files, infos=infos, config=config, component=detected,
                            layout=layout, prefix=prefix)


def _resolve_config(config, presets: dict, kind: type, source: CheckpointSource):
    if config is None:
        return source.params()
    if isinstance(config, str):
        if config not in presets:
            raise CheckpointError(f"unknown preset {config!r}; choose from {', '.join(presets)}")
        return presets[config]
    if not isinstance(config, kind):
        raise CheckpointError(f"config must be a {kind.__name__}, a preset name or None, got {type(config).__name__}")
    return config


def _load(path, component: Component, config, dtype, device):
    source = open_checkpoint(path, component)
    if component == "transformer":
        params, cls = _resolve_config(config, TRANSFORMER_PRESETS, FluxParams, source), Flux
    else:
        params, cls = _resolve_config(config, AUTOENCODER_PRESETS, AutoEncoderParams, source), AutoEncoder
    with torch.device("meta"):  # parameters without storage: the loaded tensors become the parameters
        model = cls(params)
    sd = source.state_dict(dtype=dtype, device=device)
    if source.layout == "diffusers":
        sd = convert_state_dict(sd, KEYMAPS[component], "bfl", consume=True)
    load_into(model, sd, source=source.label)
    logger.info("loaded %s from %s (%s layout)", cls.__name__, source.label, source.layout)
    return model.eval()


def load_transformer(path: str | os.PathLike, config: FluxParams | str | None = None, *,
                     dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Flux:
    """Flux in eval mode from a BFL .safetensors file or a diffusers transformer folder (sharded or not).

    config None infers the hyper-parameters (diffusers config.json, else the weights' shapes and `fluxion.*`
    metadata); dtype None keeps the stored dtypes (fp8 becomes bfloat16).
    """
    return _load(path, "transformer", config, dtype, device)


def load_autoencoder(path: str | os.PathLike, config: AutoEncoderParams | str | None = None, *,
                     dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> AutoEncoder:
    """AutoEncoder in eval mode from a BFL ae.safetensors or a diffusers vae folder (see load_transformer)."""
    return _load(path, "autoencoder", config, dtype, device)


def _component(name: str) -> Component:
    aliases = {"transformer": "transformer", "vae": "autoencoder", "autoencoder": "autoencoder"}
    if name not in aliases:
        raise CheckpointError(f"component must be 'transformer' or 'vae', got {name!r}")
    return aliases[name]


def export_diffusers(bfl_state_dict: dict[str, Tensor], params: FluxParams | AutoEncoderParams,
                     out_dir: str | os.PathLike, component: str = "transformer") -> Path:
    """Write a diffusers component folder (config.json + diffusion_pytorch_model.safetensors) from BFL weights.
    The folder is built beside out_dir and moved into place whole: an interrupted export leaves nothing."""
    component = _component(component)
    kind = FluxParams if component == "transformer" else AutoEncoderParams
    if not isinstance(params, kind):
        raise CheckpointError(f"exporting a {component} needs {kind.__name__}, got {type(params).__name__}")
    config = diffusers_config(params)  # raises before anything is written if diffusers cannot express params
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise CheckpointError(f"destination {out_dir} is a file; give a folder for the diffusers layout")
        others = sorted(p.name for p in out_dir.iterdir()
                        if p.name != "config.json" and not p.name.startswith("diffusion_pytorch_model"))
        if others:
            raise CheckpointError(f"destination {out_dir} holds other files ({', '.join(others[:5])}); give a new "
                                  "or empty folder, or a diffusers component folder to replace")
    sd = convert_state_dict(bfl_state_dict, KEYMAPS[component], "diffusers")

    def build(folder: Path) -> None:
        save_state_dict(sd, folder / DIFFUSERS_WEIGHTS, metadata={"format": "pt"})
        write_json(config, folder / "config.json")

    atomic_folder(out_dir, build)
    logger.info("exported %s to %s", component, out_dir)
    return out_dir


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: Literal["diffusers", "bfl"]) -> Path:
    """Convert a transformer or VAE between layouts: `to="diffusers"` writes a component folder at dst,
    `to="bfl"` a single .safetensors file (with `fluxion.*` metadata for what the weights cannot show)."""
    if to not in ("diffusers", "bfl"):
        raise CheckpointError(f"--to must be 'diffusers' or 'bfl', got {to!r}")
    source = open_checkpoint(src)
    if source.layout == to:
        raise CheckpointError(f"{source.label} is already in {to} layout")
    params = source.params()
    sd = source.state_dict()  # stored dtypes kept (fp8 is upcast to bfloat16)
    if to == "diffusers":
        return export_diffusers(sd, params, dst, source.component)
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"destination {dst} must end in .safetensors for a BFL-layout file")
    sd = convert_state_dict(sd, KEYMAPS[source.component], "bfl", consume=True)
    save_state_dict(sd, dst, metadata={"format": "pt", **params_metadata(params)})
    logger.info("converted %s (%s) to %s", source.label, source.component, dst)
    return dst
