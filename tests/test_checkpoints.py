"""Checkpoint I/O, validation errors, dtype handling, config detection and the component loaders."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from fluxion.checkpoints import (SCALE_FACTOR_KEY, SHIFT_FACTOR_KEY, convert_checkpoint, default_axes_dim,
                                 detect_autoencoder_params, detect_layout, detect_transformer_params,
                                 diffusers_config, export_diffusers, load_autoencoder, load_into, load_state_dict,
                                 load_transformer, params_from_diffusers_config, params_metadata,
                                 read_checkpoint_info, save_state_dict, to_diffusers)
from fluxion.errors import CheckpointError, ModelNotFoundError
from fluxion.model import AUTOENCODER_PRESETS, TRANSFORMER_PRESETS, AutoEncoder, AutoEncoderParams, Flux, FluxParams


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g),
            "steps": torch.arange(5, dtype=torch.int64)}


def _meta_shapes(module_cls, params) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # full-size presets cost no memory
        return {k: tuple(v.shape) for k, v in module_cls(params).state_dict().items()}


def _random_model(module_cls, params, seed=0):
    model = module_cls(params)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


# --- saving and loading ----------------------------------------------------------------------------------------------
def test_save_load_round_trip_with_metadata(tmp_path):
    sd = _tensors()
    path = save_state_dict(sd, tmp_path / "w.safetensors", metadata={"fluxion.theta": "10000"})
    loaded = load_state_dict(path)
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    info = read_checkpoint_info(path)
    assert info.metadata == {"fluxion.theta": "10000"}
    assert info.shapes == {"a.weight": (4, 3), "a.bias": (4,), "steps": (5,)}
    assert info.tensors["steps"].dtype == "I64" and info.num_params == 21 and info.total_bytes == 4 * 16 + 40
    assert os.listdir(tmp_path) == ["w.safetensors"]  # no temp file left behind


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = save_state_dict(_tensors(0), tmp_path / "w.safetensors")
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="expected a torch.Tensor"):
        save_state_dict({"a": torch.zeros(2), "b": "not a tensor"}, path)
    with pytest.raises(CheckpointError, match="metadata"):
        save_state_dict(_tensors(1), path, metadata={"n": 3})

    def crash_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # e.g. the process is interrupted while writing

    monkeypatch.setattr("fluxion.checkpoints.io.save_file", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_state_dict(_tensors(2), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_save_handles_views_sharing_storage(tmp_path):
    base = torch.randn(6, 4)
    q, k, v = base.chunk(3)
    path = save_state_dict({"q": q, "k": k, "v": v, "t": base.t()}, tmp_path / "views.safetensors")
    loaded = load_state_dict(path)
    assert torch.equal(loaded["k"], k) and torch.equal(loaded["t"], base.t())


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save(_tensors(), path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*model.*pickle.*arbitrary code.*safetensors"):
        load_state_dict(path)


def test_pickle_bytes_are_refused_whatever_the_name(tmp_path):
    zipped = tmp_path / "zip.safetensors"
    torch.save(_tensors(), zipped)  # zip container
    with pytest.raises(CheckpointError, match=r"zip.safetensors.*zip archive.*pickle"):
        load_state_dict(zipped)
    legacy = tmp_path / "legacy.safetensors"
    torch.save(_tensors(), legacy, _use_new_zipfile_serialization=False)  # raw pickle stream
    with pytest.raises(CheckpointError, match=r"legacy.safetensors.*Python pickle"):
        load_state_dict(legacy)
    with pytest.raises(CheckpointError, match="refusing to write"):
        save_state_dict(_tensors(), tmp_path / "out.ckpt")


def test_truncated_file(tmp_path):
    path = save_state_dict(_tensors(), tmp_path / "w.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"w.safetensors: data section is \d+ bytes but the header says "
                                              r"tensors need \d+.*truncated"):
        load_state_dict(path)
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match=r"w.safetensors: header length \d+ bytes is larger than the file "
                                              r"\(20 bytes\)"):
        load_state_dict(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"w.safetensors is 5 bytes, too short"):
        read_checkpoint_info(path)


def _write_raw(path, header: bytes, data: bytes = b""):
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def test_corrupt_headers(tmp_path):
    with pytest.raises(CheckpointError, match=r"bad.safetensors: the 9-byte header is not valid UTF-8 JSON"):
        load_state_dict(_write_raw(tmp_path / "bad.safetensors", b"{not json"))
    entry = {"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}
    with pytest.raises(CheckpointError, match=r"odd.safetensors: tensor 'x' \(F32, shape \(2, 2\)\) needs 16 bytes "
                                              r"but its data_offsets \[0, 12\] span 12"):
        load_state_dict(_write_raw(tmp_path / "odd.safetensors", json.dumps(entry).encode(), b"\0" * 12))
    entry = {"x": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}
    with pytest.raises(CheckpointError, match=r"tensor 'x' has dtype 'F4'"):
        load_state_dict(_write_raw(tmp_path / "f4.safetensors", json.dumps(entry).encode(), b"\0"))
    entry = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    with pytest.raises(CheckpointError, match=r"tail.safetensors: 4 unexpected bytes after the last tensor"):
        load_state_dict(_write_raw(tmp_path / "tail.safetensors", json.dumps(entry).encode(), b"\0" * 12))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "absent.safetensors")


# --- dtypes ---------------------------------------------------------------------------------------------------------
def test_bf16_and_fp32_load_into_requested_dtype(tmp_path):
    ref = torch.randn(8, 8)
    save_file({"w": ref.to(torch.bfloat16), "n": torch.arange(3)}, tmp_path / "bf16.safetensors")
    as_fp32 = load_state_dict(tmp_path / "bf16.safetensors", dtype=torch.float32)
    assert as_fp32["w"].dtype == torch.float32 and torch.equal(as_fp32["w"], ref.to(torch.bfloat16).float())
    assert as_fp32["n"].dtype == torch.int64  # integers are never cast
    assert load_state_dict(tmp_path / "bf16.safetensors")["w"].dtype == torch.bfloat16
    save_file({"w": ref}, tmp_path / "fp32.safetensors")
    as_bf16 = load_state_dict(tmp_path / "fp32.safetensors", dtype=torch.bfloat16)
    assert torch.equal(as_bf16["w"], ref.to(torch.bfloat16))


def test_fp8_is_upcast(tmp_path):
    fp8 = (torch.randn(16, 4) * 10).to(torch.float8_e4m3fn)
    save_file({"w": fp8}, tmp_path / "fp8.safetensors")
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load_state_dict(tmp_path / "fp8.safetensors", dtype=dtype)["w"]
        assert loaded.dtype == dtype and torch.equal(loaded, fp8.to(dtype))
    assert load_state_dict(tmp_path / "fp8.safetensors")["w"].dtype == torch.bfloat16  # fp8 is not a compute dtype


def test_scaled_fp8_is_dequantised(tmp_path):
    fp8 = torch.randn(6, 4).to(torch.float8_e4m3fn)
    save_file({"lin.weight": fp8, "lin.bias": torch.ones(6), "lin.scale_weight": torch.tensor(0.5),
               "lin.scale_input": torch.tensor(1.0), "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn),
               "other.weight": fp8.clone(), "other.weight_scale": torch.tensor([2.0])}, tmp_path / "scaled.safetensors")
    loaded = load_state_dict(tmp_path / "scaled.safetensors", dtype=torch.float32)
    assert set(loaded) == {"lin.weight", "lin.bias", "other.weight"}
    assert torch.equal(loaded["lin.weight"], fp8.float() * 0.5)
    assert torch.equal(loaded["other.weight"], fp8.float() * 2.0)


# --- load_into ------------------------------------------------------------------------------------------------------
def test_load_into_names_missing_unexpected_and_mismatched_keys():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    missing = {k: v for k, v in sd.items() if k != "1.bias"}
    with pytest.raises(CheckpointError, match=r"ck.safetensors does not match Sequential: 1 missing key\(s\): 1.bias"):
        load_into(model, missing, source="ck.safetensors")
    extra = {**sd, **{f"extra.{i}": torch.zeros(1) for i in range(8)}}
    with pytest.raises(CheckpointError, match=r"8 unexpected key\(s\): extra.0, .* and 3 more"):
        load_into(model, extra, source="ck.safetensors")
    wrong = {**sd, "0.weight": torch.zeros(5, 3)}
    with pytest.raises(CheckpointError, match=r"ck.safetensors .*1 shape mismatch\(es\): 0.weight: checkpoint "
                                              r"\(5, 3\) vs model \(4, 3\)"):
        load_into(model, wrong, source="ck.safetensors")


def test_load_into_assigns_without_copy_and_keeps_dtype():
    with torch.device("meta"):
        model = torch.nn.Linear(3, 4)
    sd = {"weight": torch.randn(4, 3, dtype=torch.bfloat16), "bias": torch.randn(4, dtype=torch.bfloat16)}
    load_into(model, sd, source="memory")
    assert model.weight.data_ptr() == sd["weight"].data_ptr() and model.weight.dtype == torch.bfloat16
    assert not model.weight.is_meta


# --- detection ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TRANSFORMER_PRESETS))
def test_detect_transformer_presets_bfl_and_diffusers(name):
    params = TRANSFORMER_PRESETS[name]
    shapes = _meta_shapes(Flux, params)
    assert detect_layout(shapes) == ("transformer", "bfl")
    assert detect_transformer_params(shapes) == params
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in to_diffusers(Flux(params).state_dict(), "transformer").items()}
    assert detect_layout(theirs) == ("transformer", "diffusers")
    assert detect_transformer_params(theirs) == params


def test_detect_dev_schnell_and_variants():
    dev, schnell = TRANSFORMER_PRESETS["flux-dev"], TRANSFORMER_PRESETS["flux-schnell"]
    assert detect_transformer_params(_meta_shapes(Flux, dev)).guidance_embed is True
    assert detect_transformer_params(_meta_shapes(Flux, schnell)).guidance_embed is False
    fill = FluxParams(in_channels=384, out_channels=64)
    assert detect_transformer_params(_meta_shapes(Flux, fill)) == fill
    control = FluxParams(in_channels=128, out_channels=64)
    assert detect_transformer_params(_meta_shapes(Flux, control)) == control


@pytest.mark.parametrize("seed", range(4))
def test_detect_random_transformer_sizes(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    heads, head_dim, depth = r(1, 6), 16 * r(1, 8), r(0, 3)
    params = FluxParams(in_channels=r(1, 200), out_channels=r(1, 100), vec_in_dim=r(1, 900),
                        context_in_dim=r(1, 900), hidden_size=heads * head_dim, mlp_ratio=[2.0, 3.0, 4.0][r(0, 2)],
                        num_heads=heads, depth=depth, depth_single_blocks=r(1, 3),
                        axes_dim=default_axes_dim(head_dim), qkv_bias=bool(r(0, 1)) if depth else True,
                        guidance_embed=bool(r(0, 1)))
    assert detect_transformer_params(_meta_shapes(Flux, params)) == params


def test_detect_reads_rope_settings_from_metadata():
    params = FluxParams(hidden_size=96, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 20, 20],
                        theta=500, qkv_bias=False)
    shapes = _meta_shapes(Flux, params)
    guessed = detect_transformer_params(shapes)
    assert guessed.axes_dim == default_axes_dim(48) == [6, 20, 22] and guessed.theta == 10_000
    assert guessed.qkv_bias is False
    assert detect_transformer_params(shapes, params_metadata(params)) == params


def test_default_axes_dim_matches_flux_proportions():
    assert default_axes_dim(128) == [16, 56, 56]
    assert default_axes_dim(64) == [8, 28, 28] and default_axes_dim(32) == [4, 14, 14]
    for head_dim in range(2, 300, 2):
        axes = default_axes_dim(head_dim)
        assert sum(axes) == head_dim and all(a % 2 == 0 and a >= 0 for a in axes)


@pytest.mark.parametrize("name", list(AUTOENCODER_PRESETS))
def test_detect_autoencoder_presets(name):
    params = AUTOENCODER_PRESETS[name]
    shapes = _meta_shapes(AutoEncoder, params)
    detected = detect_autoencoder_params(shapes, params_metadata(params))
    assert detected == params
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in to_diffusers(AutoEncoder(params).state_dict(), "autoencoder").items()}
    assert detect_autoencoder_params(theirs, params_metadata(params)) == params


def test_autoencoder_scale_shift_default_to_flux_and_read_metadata():
    params = AutoEncoderParams(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=8)
    shapes = _meta_shapes(AutoEncoder, params)
    detected = detect_autoencoder_params(shapes)
    assert (detected.scale_factor, detected.shift_factor) == (0.3611, 0.1159)
    assert (detected.ch, detected.ch_mult, detected.num_res_blocks, detected.z_channels) == (32, [1, 2], 1, 8)
    custom = detect_autoencoder_params(shapes, {SCALE_FACTOR_KEY: "0.5", SHIFT_FACTOR_KEY: "-0.25"})
    assert (custom.scale_factor, custom.shift_factor) == (0.5, -0.25)


def test_detection_errors_name_the_problem():
    with pytest.raises(CheckpointError, match="cannot tell what these weights are.*first keys: foo"):
        detect_layout({"foo": (1,)})
    shapes = _meta_shapes(Flux, TRANSFORMER_PRESETS["debug"])
    del shapes["txt_in.weight"]
    with pytest.raises(CheckpointError, match="context_in_dim: key 'txt_in.weight' is missing"):
        detect_transformer_params(shapes)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        detect_transformer_params(_meta_shapes(Flux, TRANSFORMER_PRESETS["debug"]), {"fluxion.theta": "ten"})


def test_diffusers_config_round_trip_and_limits():
    for params in (TRANSFORMER_PRESETS["flux-dev"], TRANSFORMER_PRESETS["tiny-schnell"], AUTOENCODER_PRESETS["flux"],
                   AUTOENCODER_PRESETS["tiny"]):
        assert params_from_diffusers_config(diffusers_config(params)) == params
    with pytest.raises(CheckpointError, match="mlp_ratio=4.0"):
        diffusers_config(FluxParams(mlp_ratio=2.0))
    with pytest.raises(CheckpointError, match="quant_conv"):
        params_from_diffusers_config({"_class_name": "AutoencoderKL", "block_out_channels": [128]})
    with pytest.raises(CheckpointError, match="UNet2DConditionModel"):
        params_from_diffusers_config({"_class_name": "UNet2DConditionModel"})


# --- loaders --------------------------------------------------------------------------------------------------------
def test_load_transformer_equals_saved_model(tmp_path):
    params = TRANSFORMER_PRESETS["debug"]
    model = _random_model(Flux, params)
    save_state_dict(model.state_dict(), tmp_path / "flux.safetensors", metadata=params_metadata(params))
    loaded = load_transformer(tmp_path / "flux.safetensors")
    assert isinstance(loaded, Flux) and not loaded.training and loaded.params == params
    sd, ref = loaded.state_dict(), model.state_dict()
    assert all(torch.equal(sd[k], ref[k]) and not sd[k].is_meta for k in ref)
    half = load_transformer(tmp_path / "flux.safetensors", "debug", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(1, 4, 64, generator=g), torch.randn(1, 3, 32, generator=g)
    y = torch.randn(1, 32, generator=g)
    ids_img, ids_txt = torch.zeros(1, 4, 3), torch.zeros(1, 3, 3)
    args = (img, ids_img, txt, ids_txt, torch.tensor([0.5]), y)
    with torch.no_grad():
        assert torch.equal(loaded(*args, guidance=torch.tensor([2.0])), model(*args, guidance=torch.tensor([2.0])))


def test_load_transformer_from_sharded_diffusers_folder_and_prefixed_file(tmp_path):
    params = TRANSFORMER_PRESETS["debug"]
    model = _random_model(Flux, params, seed=1)
    export_diffusers(model.state_dict(), params, tmp_path / "export", component="transformer")
    theirs = load_state_dict(tmp_path / "export" / "diffusion_pytorch_model.safetensors")
    folder = tmp_path / "pipeline" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((tmp_path / "export" / "config.json").read_text())
    keys = sorted(theirs)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_state_dict({k: theirs[k] for k in part}, folder / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))

    for source in (folder, tmp_path / "pipeline"):  # the component folder, or the pipeline root
        loaded = load_transformer(source)
        assert loaded.params == params
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())

    prefixed = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    prefixed["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # other components are ignored
    save_state_dict(prefixed, tmp_path / "all_in_one.safetensors", metadata=params_metadata(params))
    loaded = load_transformer(tmp_path / "all_in_one.safetensors")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())

    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shards that are not in .*00002-of-00002"):
        load_transformer(folder)


def test_loader_errors(tmp_path):
    params = TRANSFORMER_PRESETS["debug"]
    save_state_dict(_random_model(Flux, params).state_dict(), tmp_path / "flux.safetensors")
    with pytest.raises(CheckpointError, match=r"flux.safetensors does not match Flux: .*shape mismatch"):
        load_transformer(tmp_path / "flux.safetensors", FluxParams(**{**params.__dict__, "hidden_size": 128,
                                                                    "num_heads": 4}))
    with pytest.raises(CheckpointError, match="holds transformer weights, not autoencoder weights"):
        load_autoencoder(tmp_path / "flux.safetensors")
    with pytest.raises(CheckpointError, match="unknown preset 'huge'"):
        load_transformer(tmp_path / "flux.safetensors", "huge")
    with pytest.raises(ModelNotFoundError, match="nowhere.safetensors does not exist"):
        load_transformer(tmp_path / "nowhere.safetensors")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    torch.save({}, pickled / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no .safetensors weights in .*pickled .*model.bin.*pickle"):
        load_transformer(pickled, "debug")


def test_load_autoencoder_from_bfl_file_with_scale_metadata(tmp_path):
    params = AutoEncoderParams(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, scale_factor=0.7,
                               shift_factor=0.05)
    model = _random_model(AutoEncoder, params, seed=2)
    save_state_dict(model.state_dict(), tmp_path / "ae.safetensors", metadata=params_metadata(params))
    loaded = load_autoencoder(tmp_path / "ae.safetensors", dtype=torch.float32)
    assert loaded.params == params and (loaded.scale_factor, loaded.shift_factor) == (0.7, 0.05)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))


@pytest.mark.parametrize("component", ["transformer", "vae"])
def test_convert_checkpoint_both_ways_is_exact(tmp_path, component):
    if component == "transformer":
        params, model = TRANSFORMER_PRESETS["debug"], _random_model(Flux, TRANSFORMER_PRESETS["debug"])
    else:
        params = AutoEncoderParams(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, scale_factor=0.9)
        model = _random_model(AutoEncoder, params)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    src = save_state_dict(sd, tmp_path / "bfl.safetensors", metadata=params_metadata(params))
    out = convert_checkpoint(src, tmp_path / "diffusers", to="diffusers")
    assert json.loads((out / "config.json").read_text())["_class_name"] in ("FluxTransformer2DModel", "AutoencoderKL")
    back = convert_checkpoint(out, tmp_path / "back.safetensors", to="bfl")
    again = load_state_dict(back)
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)
    loader = load_transformer if component == "transformer" else load_autoencoder
    assert loader(back).params == params  # fluxion.* metadata carried the settings the weights cannot show
    with pytest.raises(CheckpointError, match="already in bfl layout"):
        convert_checkpoint(back, tmp_path / "x", to="bfl")
