"""Training engine: every stage end to end on tiny configs, bit-exact resume, NaN stop, config errors, objectives."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from fluxion.checkpoints import load_autoencoder, load_state_dict, load_transformer, read_checkpoint_info
from fluxion.data import LAYOUTS, ShapesDataset, collate
from fluxion.errors import CheckpointError
from fluxion.model import Flux, FluxParams
from fluxion.pipeline import Pipeline
from fluxion.registry import resolve
from fluxion.sampling import get_schedule
from fluxion.training import (ConfigError, TrainingDiverged, load_config, load_stages, objectives, parse_stages, run,
                              run_recipe)
from fluxion.training.batches import BatchStream, FeatureCache, cache_key
from fluxion.training.checkpoint import CHECKPOINT, STATE_KEY
from fluxion.training.config import OptimConfig, toml_text
from fluxion.training.ema import EMA
from fluxion.training.export import export_model
from fluxion.training.loop import learning_rate
from fluxion.training.stages import init_from

BUCKETS = [[32, 32], [48, 64]]  # (32, 48) trips a layout bug of the shapes world at this size
TINY_FLUX = {"vec_in_dim": 384, "context_in_dim": 384}  # the "debug" preset (hidden 64) fed by MiniLM
QUIET_LOG = {"log_every": 1, "plot_every": 1000, "sample_every": 0, "checkpoint_every": 2, "sample_size": 32,
             "progress": False}


# -- writing recipes ------------------------------------------------------------------------------------------------
def write_recipe(path: Path, sections: dict) -> Path:
    path.write_text(toml_text(sections))
    return path


def vae_recipe(root: Path, name: str = "vae", steps: int = 4, **run) -> dict:
    return {
        "run": {"name": name, "stage": "vae", "out_dir": str(root / name), "steps": steps, "batch_size": 4, **run},
        "data": {"num_images": 64, "buckets": [[32, 32]]},  # the autoencoder does not care about aspect ratio
        "model": {"preset": "debug", "params": {"ch_mult": [1, 1, 1, 1]}},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "schedule": "cosine"},
        "objective": {"stats_images": 16},
        "log": dict(QUIET_LOG),
    }


def flux_recipe(root: Path, ae: Path, name: str, stage: str, variant: str, steps: int = 4, guidance: bool = False,
                objective: dict | None = None, model: dict | None = None, **run) -> dict:
    return {
        "run": {"name": name, "stage": stage, "out_dir": str(root / name), "steps": steps, "batch_size": 4, **run},
        # 24 MiniLM tokens, not the default 32: the length must reach the manifest and the pipeline
        "data": {"num_images": 24, "buckets": BUCKETS, "cache_dir": str(root / "cache"), "text_length": 24},
        # captions' tokens numbered in RoPE (off by default): the flag must reach the batches, manifest and pipeline
        "model": {"preset": "debug", "params": {**TINY_FLUX, "guidance_embed": guidance}, "autoencoder": str(ae),
                  "text_positions": True, **(model or {})},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "objective": objective or {},
        "log": {**QUIET_LOG, "sample_prompts": ["a red circle", "two blue squares"], "sample_seeds": [0]},
        "export": {"variant": variant, "defaults": {"num_inference_steps": 2, "size": 32}},
    }


# -- the four stages, once each, shared by the tests below ----------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def vae_run(root) -> Path:
    return run(write_recipe(root / "vae.toml", vae_recipe(root)))


@pytest.fixture(scope="module")
def ae_path(vae_run) -> Path:
    return vae_run / "model" / "ae.safetensors"


@pytest.fixture(scope="module")
def pro_run(root, ae_path) -> Path:
    recipe = flux_recipe(root, ae_path, "pro", "flow", "pro", objective={"caption_dropout": 0.5})
    recipe["log"]["sample_every"] = 4
    recipe["export"]["dir"] = str(root / "export" / "tiny-test-pro")
    return run(write_recipe(root / "pro.toml", recipe))


@pytest.fixture(scope="module")
def dev_run(root, ae_path, pro_run) -> Path:
    teacher = str(pro_run / "model" / "transformer.safetensors")
    recipe = flux_recipe(root, ae_path, "dev", "guidance", "dev", guidance=True, objective={"teacher": teacher},
                         model={"init_from": teacher})
    return run(write_recipe(root / "dev.toml", recipe))


def checkpoint_state(run_dir: Path) -> tuple[dict, dict]:
    path = run_dir / CHECKPOINT
    return load_state_dict(path), json.loads(read_checkpoint_info(path).metadata[STATE_KEY])


def test_vae_stage_trains_checkpoints_and_measures_latent_scale(vae_run):
    tensors, state = checkpoint_state(vae_run)
    assert state["step"] == 4 and state["data"] == {"epoch": 0, "index": 4}
    assert {k.split(".")[0] for k in tensors} == {"model", "ema", "optim", "rng"}
    rows = [json.loads(line) for line in (vae_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert {"l1", "mse", "kl", "samples_per_s", "steps_per_s"} <= rows[0].keys()
    assert (vae_run / "loss.png").stat().st_size > 0

    path = vae_run / "model" / "ae.safetensors"
    meta = read_checkpoint_info(path).metadata
    ae = load_autoencoder(path)
    assert ae.scale_factor == json.loads(meta["fluxion.scale_factor"])
    assert ae.shift_factor == json.loads(meta["fluxion.shift_factor"])
    # the stored scale/shift normalise the posterior means of the images they were measured on
    ds = ShapesDataset(seed=0, length=64, buckets=[(32, 32)])
    with torch.no_grad():
        z = ae.encode(collate([ds[i] for i in range(16)])[0])
    assert abs(z.mean().item()) < 1e-4 and abs(z.std().item() - 1) < 1e-4


def test_flow_stage_ships_a_loadable_pro_model(pro_run, root):
    _, state = checkpoint_state(pro_run)
    assert state["step"] == 4
    assert (pro_run / "samples" / "step-0000004.png").stat().st_size > 0
    model = pro_run / "model"
    manifest = json.loads((model / "fluxion.json").read_text())
    assert manifest["variant"] == "pro" and manifest["text_encoder"] == "minilm" and manifest["text_length"] == 24
    assert manifest["text_positions"] is True
    assert manifest["defaults"]["num_inference_steps"] == 2 and manifest["defaults"]["true_cfg_scale"] == 4.0
    transformer = load_transformer(model / "transformer.safetensors")
    assert transformer.params == load_config(root / "pro.toml").model_params()
    assert not transformer.params.guidance_embed

    exported = root / "export" / "tiny-test-pro"
    files = resolve(str(exported))
    assert (files.variant, files.text_encoder, files.name) == ("pro", "minilm", "pro")
    assert files.transformer == exported / "transformer.safetensors"
    assert set(read_checkpoint_info(files.transformer).dtype_counts()) == {"BF16"}
    assert read_checkpoint_info(files.autoencoder).metadata == read_checkpoint_info(model / "ae.safetensors").metadata
    # the shipped weights are the EMA weights, rounded to bf16
    ema = {k[4:]: v for k, v in checkpoint_state(pro_run)[0].items() if k.startswith("ema.")}
    shipped = load_state_dict(files.transformer)
    assert all(torch.equal(shipped[k], v.to(torch.bfloat16)) for k, v in ema.items())
    # exporting files already in the target dtype copies their bytes: the same VAE is the same blob in every model
    again = export_model(exported, root / "export" / "again", "bf16")
    assert all((again / f.name).read_bytes() == f.read_bytes() for f in exported.glob("*.safetensors"))
    pipe = Pipeline.from_pretrained(str(exported))
    assert (pipe.variant, pipe.defaults.num_inference_steps, pipe.defaults.size) == ("pro", 2, 32)
    assert pipe.text_encoder.max_length == 24  # prompts padded as the captions it was trained on
    assert pipe.text_positions and pipe.encode_prompt(["a red circle"]).txt_ids[0, :, 0].tolist() == list(range(24))
    assert pipe("a red circle", seed=0)[0].size == (32, 32)


def test_guidance_stage_student_embeds_guidance(dev_run):
    _, state = checkpoint_state(dev_run)
    assert state["step"] == 4
    student = load_transformer(dev_run / "model" / "transformer.safetensors")
    assert student.params.guidance_embed
    assert json.loads((dev_run / "model" / "fluxion.json").read_text())["variant"] == "dev"


def test_fewstep_stage_distils_dev_into_a_guidance_free_student(root, ae_path, dev_run):
    teacher = str(dev_run / "model" / "transformer.safetensors")
    recipe = flux_recipe(root, ae_path, "schnell", "fewstep", "schnell", steps=2,
                         objective={"teacher": teacher, "teacher_substeps": 2, "student_steps": [1, 4],
                                    "student_rollout": 0.5, "shift": True, "segment_weights": [2, 2, 1, 1, 1]},
                         model={"init_from": teacher, "init_guidance": 3.5})
    recipe["export"]["defaults"]["shift"] = True  # sampled on the resolution-shifted schedule
    out = run(write_recipe(root / "schnell.toml", recipe))
    assert checkpoint_state(out)[1]["step"] == 2
    student = load_transformer(out / "model" / "transformer.safetensors")
    assert not student.params.guidance_embed
    manifest = json.loads((out / "model" / "fluxion.json").read_text())
    assert manifest["variant"] == "schnell" and manifest["defaults"]["shift"] is True


# -- resume, divergence ---------------------------------------------------------------------------------------------
def _assert_same_state(a: Path, b: Path) -> None:
    (ta, sa), (tb, sb) = checkpoint_state(a), checkpoint_state(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"tensors differ after resume: {different[:5]}"
    assert (sa["step"], sa["data"], sa["ema_updates"]) == (sb["step"], sb["data"], sb["ema_updates"])


@pytest.mark.parametrize("stage", ["vae", "flow", "guidance", "fewstep"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(root, ae_path, pro_run, dev_run, stage):
    def recipe(name):
        if stage == "vae":
            sections = vae_recipe(root, name, steps=6)
        elif stage == "flow":
            sections = flux_recipe(root, ae_path, name, "flow", "pro", steps=6, objective={"caption_dropout": 0.5})
        elif stage == "guidance":
            teacher = str(pro_run / "model" / "transformer.safetensors")
            sections = flux_recipe(root, ae_path, name, "guidance", "dev", steps=6, guidance=True,
                                   objective={"teacher": teacher, "caption_dropout": 0.3},
                                   model={"init_from": teacher})
        else:
            teacher = str(dev_run / "model" / "transformer.safetensors")
            sections = flux_recipe(root, ae_path, name, "fewstep", "schnell", steps=6,
                                   objective={"teacher": teacher, "teacher_substeps": 2, "student_rollout": 0.5},
                                   model={"init_from": teacher, "init_guidance": 3.5})
        sections["optim"]["schedule"] = "cosine"
        sections["data"]["num_images"] = 16  # 2 batches per bucket (4 for the 1-bucket VAE): 6 steps cross an epoch
        return write_recipe(root / f"{name}.toml", sections)

    straight = run(recipe(f"{stage}-straight"))
    resumed_cfg = recipe(f"{stage}-resumed")
    run(resumed_cfg, max_steps=3)
    assert checkpoint_state(root / f"{stage}-resumed")[1]["step"] == 3
    assert not (root / f"{stage}-resumed" / "model").exists()  # not finished yet
    resumed = run(resumed_cfg)
    _assert_same_state(straight, resumed)
    assert checkpoint_state(resumed)[1]["data"]["epoch"] == 1
    rows = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]


def test_a_killed_run_resumes_to_the_same_weights(root):
    def recipe(name, checkpoint_every):
        sections = vae_recipe(root, name, steps=12)
        sections["log"]["checkpoint_every"] = checkpoint_every
        return write_recipe(root / f"{name}.toml", sections)

    def saved_step(run_dir: Path) -> int:
        path = run_dir / CHECKPOINT
        return json.loads(read_checkpoint_info(path).metadata[STATE_KEY])["step"] if path.is_file() else 0

    straight = run(recipe("kill-straight", 6))
    config = recipe("kill", 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same threads: same float sums
    # The child stalls after its step-3 checkpoint, so the kill lands mid-run however fast the steps are (a fast
    # machine used to finish all 12 steps between two polls).
    child = f"""
import time
import tomllib
from fluxion.training import loop, run
save = loop.save_checkpoint
def save_then_stall(path, **state):
    save(path, **state)
    if state["step"] == 3:
        time.sleep(600)
loop.save_checkpoint = save_then_stall
run({str(config)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", child], env=env)
    try:
        deadline = time.monotonic() + 240  # generous: CI runs two test workers on two cores
        while saved_step(root / "kill") < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait()
    assert 3 <= saved_step(root / "kill") < 12
    _assert_same_state(straight, run(config))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(root, ae_path, monkeypatch):
    sections = flux_recipe(root, ae_path, "nan", "flow", "pro", steps=4)
    config = write_recipe(root / "nan.toml", sections)
    reference = run(write_recipe(root / "nan-ref.toml", flux_recipe(root, ae_path, "nan-ref", "flow", "pro",
                                                                     steps=4)), max_steps=2)
    real, calls = objectives.flow_matching_loss, []

    def poisoned(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(objectives, "flow_matching_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3.*last good checkpoint"):
        run(config)
    tensors, state = checkpoint_state(root / "nan")
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    _assert_same_state(root / "nan", reference)
    monkeypatch.setattr(objectives, "flow_matching_loss", real)
    assert (run(config) / "model" / "transformer.safetensors").is_file()  # resumes from the kept checkpoint


# -- configs --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, key", [
    (lambda r: r["optim"].update(lrr=1e-3), "optim.lrr"),
    (lambda r: r["run"].pop("steps"), "run.steps"),
    (lambda r: r["run"].update(batch_size="4"), "run.batch_size"),
    (lambda r: r["run"].update(stage="gan"), "run.stage"),
    (lambda r: r["model"]["params"].update(hidden=8), "model.params.hidden"),
    (lambda r: r["model"].update(preset="flux-dev"), "model.preset"),
    (lambda r: r["objective"].update(t_mean=0.0), "objective.t_mean"),
    (lambda r: r["log"].update(sample_seeds=[0, "1"]), "log.sample_seeds[1]"),
    (lambda r: r.update(trainer={}), "[trainer]"),
    (lambda r: r["data"].update(text_length=2), "data.text_length"),
    (lambda r: r["data"].update(p_relation=1.5), "data.p_relation"),
    (lambda r: r["data"].update(layout="grid"), "data.layout"),
    (lambda r: r["data"].update(balance_order=True), "data.balance_order"),  # the default layout is "spread"
    (lambda r: r["data"].update(shapes=["star"]), "data.shapes"),  # held out, and not taught
    (lambda r: r["data"].update(shapes=["hexagon"]), "data.shapes[0]"),
    (lambda r: r["data"].update(teach="star"), "data.teach"),  # not among data.shapes
])
def test_config_errors_name_the_file_and_key(tmp_path, edit, key):
    recipe = vae_recipe(tmp_path)
    edit(recipe)
    path = write_recipe(tmp_path / "bad.toml", recipe)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert key in str(e.value) and str(path) in str(e.value)


def test_transformer_stage_configs_require_their_inputs(tmp_path):
    recipe = flux_recipe(tmp_path, tmp_path / "ae.safetensors", "dev", "guidance", "dev", guidance=True)
    with pytest.raises(ConfigError, match="missing key objective.teacher"):
        load_config(write_recipe(tmp_path / "a.toml", recipe))
    recipe["objective"] = {"teacher": "t.safetensors"}
    recipe["model"]["params"]["guidance_embed"] = False
    with pytest.raises(ConfigError, match="model.params.guidance_embed"):
        load_config(write_recipe(tmp_path / "b.toml", recipe))
    recipe = flux_recipe(tmp_path, tmp_path / "ae.safetensors", "pro", "flow", "turbo")
    with pytest.raises(ConfigError, match="export.variant"):
        load_config(write_recipe(tmp_path / "c.toml", recipe))
    recipe = flux_recipe(tmp_path, tmp_path / "ae.safetensors", "schnell", "fewstep", "schnell",
                         objective={"teacher": "t.safetensors", "student_rollout": 1.5})
    with pytest.raises(ConfigError, match="objective.student_rollout"):
        load_config(write_recipe(tmp_path / "d.toml", recipe))
    recipe = flux_recipe(tmp_path, tmp_path / "ae.safetensors", "schnell", "fewstep", "schnell",
                         objective={"teacher": "t.safetensors", "student_steps": [1, 4], "segment_weights": [1, 1]})
    with pytest.raises(ConfigError, match=r"objective.segment_weights must list one weight >= 0 per student step "
                                          r"\(5 for student_steps \[1, 4\]\)"):
        load_config(write_recipe(tmp_path / "d2.toml", recipe))
    recipe = flux_recipe(tmp_path, tmp_path / "ae.safetensors", "dev", "guidance", "dev", guidance=True,
                         objective={"teacher": "t.safetensors", "t_std": 0.0})
    with pytest.raises(ConfigError, match="objective.t_std"):  # checked for every objective that draws t
        load_config(write_recipe(tmp_path / "e.toml", recipe))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_shipped_recipes_parse_and_fit_the_size_budget():
    recipes = Path(__file__).parent.parent / "recipes"
    current, history = sorted(recipes.glob("*.toml")), sorted((recipes / "history").glob("*.toml"))
    # at most three recipes per model: the teacher chain, then the sizes (tiny-pro), then the distillations (tiny-dev
    # and tiny-schnell, one recipe of two stages); the VAE's own; the past in history/
    assert {p.stem for p in current} == {"tiny-vae", "tiny-pro-teacher", "tiny-pro-sizes", "tiny-dev-schnell",
                                         "lora-star"} and history
    for path in current + history:
        for cfg in load_stages(path):
            shipped = Path(cfg.export.dir).parent == Path("src/fluxion/models")
            assert not (shipped and path in history), f"{cfg.source} would export over a shipped model"
            assert not shipped or Path(cfg.export.dir).name == cfg.run.name  # the manifest's name is the model's
            if not cfg.is_vae and cfg.run.stage != "lora":
                params = sum(p.numel() for p in Flux(cfg.model_params()).parameters())
                assert params * 2 <= 25e6 - 6.5e6  # bf16 transformer beside the bf16 tiny VAE (3.0M parameters)


def test_the_teacher_chain_holds_the_stages_it_replaced():
    recipes = Path(__file__).parent.parent / "recipes"
    stages = load_stages(recipes / "tiny-pro-teacher.toml")
    for cfg in stages[:-1]:  # each as its own recipe ran it, every setting
        assert cfg.to_dict() == load_config(recipes / "history" / f"{cfg.run.name}.toml").to_dict(), cfg.source
    last, old = stages[-1].to_dict(), load_config(recipes / "history" / "tiny-pro.toml").to_dict()
    # the last ran as "tiny-pro" into the shipped folder; it now feeds recipes/tiny-pro-sizes.toml instead
    assert last["export"].pop("dir") == "weights/tiny-pro-previous" and old["export"].pop("dir") == ""
    assert (last["run"].pop("name"), last["run"].pop("out_dir")) == ("tiny-pro-previous", "runs/tiny-pro-previous")
    assert (old["run"].pop("name"), old["run"].pop("out_dir")) == ("tiny-pro", "runs/tiny-pro")
    assert last == old
    for before, after in zip(stages, stages[1:]):
        assert after.model.init_from == f"{before.run.out_dir}/model/transformer.safetensors"
    *earlier, sizes = load_stages(recipes / "tiny-pro-sizes.toml")
    assert earlier[0].model.init_from == "weights/tiny-pro-previous/transformer.safetensors"
    for before, after in zip(earlier, earlier[1:] + [sizes]):
        assert after.model.init_from == f"{before.run.out_dir}/model/transformer.safetensors"
        assert after.data.captions in ("varied", "rich") and not before.export.dir  # only the last one ships
    assert sizes.export.dir == "src/fluxion/models/tiny-pro"
    rich = load_config(recipes / "history" / "tiny-pro-sizes-rich.toml")  # the stage after it, not shipped
    assert rich.model.init_from == f"{sizes.run.out_dir}/model/transformer.safetensors" and not rich.export.dir
    # the family's last recipe shares the teacher's scenes, sizes, captions and shift, and chains to it
    dev, schnell = load_stages(recipes / "tiny-dev-schnell.toml")
    assert dev.to_dict()["data"] == schnell.to_dict()["data"] == sizes.to_dict()["data"]
    assert dev.model.shift_schedule == schnell.model.shift_schedule == sizes.model.shift_schedule
    assert dev.objective.teacher == dev.model.init_from == f"{sizes.run.out_dir}/model/transformer.safetensors"
    assert schnell.objective.teacher == schnell.model.init_from == f"{dev.run.out_dir}/model/transformer.safetensors"


# -- recipes with stages --------------------------------------------------------------------------------------------
def staged_recipe(root: Path, ae: Path, names=("a", "b")) -> dict:
    """Two flow stages sharing a tiny recipe; the second starts from the first's model at a lower rate."""
    shared = flux_recipe(root, ae, "unused", "flow", "pro", steps=2)
    del shared["run"]["name"], shared["run"]["out_dir"]
    first, second = ({"run": {"name": n, "out_dir": str(root / n)}} for n in names)
    second |= {"model": {"init_from": str(root / names[0] / "model" / "transformer.safetensors")},
               "optim": {"lr": 1e-4}, "run": {**second["run"], "steps": 3}}
    return {**shared, "stages": [first, second]}


def test_stages_merge_over_the_shared_tables(tmp_path):
    recipe = staged_recipe(tmp_path, tmp_path / "ae.safetensors")
    recipe["stages"][1]["model"]["params"] = {"depth": 1}  # one nested key: the other params stay
    a, b = parse_stages(recipe, "r.toml")
    assert (a.source, b.source) == ("r.toml#a", "r.toml#b")
    assert (a.optim.lr, b.optim.lr, a.optim.warmup_steps, b.optim.warmup_steps) == (1e-3, 1e-4, 1, 1)
    assert (a.run.steps, b.run.steps, b.run.batch_size) == (2, 3, 4)
    assert (a.model_params().depth, b.model_params().depth) == (2, 1)
    assert b.model.params == {**TINY_FLUX, "guidance_embed": False, "depth": 1}
    assert b.model.text_positions and b.model.init_from.endswith("transformer.safetensors") and not a.model.init_from
    path = write_recipe(tmp_path / "r.toml", recipe)
    assert [c.to_dict() for c in load_stages(path)] == [a.to_dict(), b.to_dict()]
    with pytest.raises(ConfigError, match=r"holds \[\[stages\]\].*load_stages"):
        load_config(path)
    assert [c.run.name for c in load_stages(write_recipe(tmp_path / "one.toml", vae_recipe(tmp_path)))] == ["vae"]


@pytest.mark.parametrize("edit, words", [
    (lambda r: r["stages"][1]["run"].pop("name"), "stages[1].run.name is required"),
    (lambda r: r["stages"][1]["run"].update(name="a"), "stages[1].run.name 'a' is also stages[0]'s"),
    (lambda r: r["stages"][1]["run"].update(out_dir=r["stages"][0]["run"]["out_dir"] + "/"), "stages[1].run.out_dir"),
    (lambda r: r["stages"][1].update(optim={"lr": -1.0}), "r.toml#b: key optim.lr"),
    (lambda r: r.update(stages=[]), "stages must be an array of tables"),
])
def test_stage_errors_name_the_stage_and_key(tmp_path, edit, words):
    recipe = staged_recipe(tmp_path, tmp_path / "ae.safetensors")
    recipe["run"]["name"] = "shared"  # a shared name does not name a stage
    edit(recipe)
    with pytest.raises(ConfigError) as e:
        parse_stages(recipe, "r.toml")
    assert words in str(e.value)


def test_a_staged_recipe_runs_its_stages_in_order_and_skips_finished_ones(root, ae_path, monkeypatch, capsys):
    from fluxion.cli import main
    from fluxion.training import loop

    path = write_recipe(root / "staged.toml", staged_recipe(root, ae_path, ("st-a", "st-b")))
    with pytest.raises(ConfigError, match="out_dir"):
        run_recipe(path, out_dir=root / "elsewhere")
    with pytest.raises(ConfigError, match="no stage named 'c'; its stages are st-a, st-b"):
        run_recipe(path, stage="c")
    # --max-steps stops each stage there: the first stops short, and the second, which starts from it, waits
    assert run_recipe(path, max_steps=1) == [root / "st-a"]
    assert checkpoint_state(root / "st-a")[1]["step"] == 1 and not (root / "st-b").exists()
    assert run_recipe(path) == [root / "st-a", root / "st-b"]
    assert checkpoint_state(root / "st-b")[1]["step"] == 3
    b = load_stages(path)[1]
    manifest = json.loads((root / "st-b" / "model" / "fluxion.json").read_text())
    assert manifest["name"] == "st-b" and manifest["training"]["recipe"] == f"{path}#st-b"
    # the stage's run folder holds its merged config, a one-run recipe that reads back the same
    assert load_config(root / "st-b" / "config.toml").to_dict() == b.to_dict()
    # the second stage started from the first one's model
    assert checkpoint_state(root / "st-b")[1]["config"]["model"]["init_from"] == b.model.init_from

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(loop, "run", no_training)
    assert run_recipe(path) == [root / "st-a", root / "st-b"]
    assert run_recipe(path, stage="st-b") == [root / "st-b"]
    with pytest.raises(AssertionError, match="trained again"):
        run_recipe(path, stage="st-b", resume=False)
    assert main(["train", str(path), "--stage", "st-b"]) == 0
    assert capsys.readouterr().out == f"run folder: {root / 'st-b'}\n"
    assert main(["train", str(path), "--out-dir", str(root / "elsewhere")]) == 2
    assert "out_dir (--out-dir) is for one-run recipes" in capsys.readouterr().err


# -- objectives -----------------------------------------------------------------------------------------------------
def test_flow_matching_loss_of_the_exact_velocity_is_zero():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    exact = lambda x_t, t: (x_t - x0) / t.view(-1, 1, 1)  # noqa: E731  (x_t - x0 = t (eps - x0))
    assert objectives.flow_matching_loss(exact, x0, noise, t).item() < 1e-10
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    assert torch.allclose(objectives.flow_matching_loss(zero, x0, noise, t), (noise - x0).pow(2).mean())
    assert torch.equal(objectives.interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(objectives.interpolate(x0, noise, torch.ones(3)), noise)


def test_timestep_shift_equals_moving_the_logit_normal_mean():
    a = objectives.sample_timesteps(1000, torch.Generator().manual_seed(1), mean=0.2, std=0.8, mu=0.46)
    b = objectives.sample_timesteps(1000, torch.Generator().manual_seed(1), mean=0.2 + 0.46, std=0.8)
    assert torch.allclose(a, b, atol=1e-6) and bool(((a > 0) & (a < 1)).all())


def test_guidance_target_at_w1_is_the_conditional_teacher_output():
    g = torch.Generator().manual_seed(0)
    v_cond, v_uncond = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    # equal up to the rounding of u + 1 * (c - u)
    assert torch.allclose(objectives.guidance_target(v_cond, v_uncond, torch.ones(2)), v_cond, rtol=0, atol=1e-6)
    assert torch.equal(objectives.guidance_target(v_cond, v_uncond, torch.zeros(2)), v_uncond)
    w = torch.tensor([2.0, 4.0])
    assert objectives.guidance_distillation_loss(v_uncond + w.view(2, 1, 1) * (v_cond - v_uncond), v_cond,
                                                 v_uncond, w).item() < 1e-10


def test_jump_target_matches_teacher_integration():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=g)
    t, t_next = torch.tensor([1.0, 0.5]), torch.tensor([0.75, 0.25])
    const = torch.randn(2, 3, 4, generator=g)
    # a straight teacher path: one jump is exact whatever the sub-steps, up to fp32 round-off of (x' - x) / dt,
    # which grows with |x| (unseeded inputs made a 1e-6 tolerance fail now and then)
    assert torch.allclose(objectives.jump_target(lambda x, t: const, x, t, t_next, 5), const, atol=1e-5)
    # one sub-step: the teacher's own velocity at (x_t, t)
    linear = lambda x, t: x * t.view(-1, 1, 1)  # noqa: E731
    assert torch.allclose(objectives.jump_target(linear, x, t, t_next, 1), linear(x, t), atol=1e-6)
    # many sub-steps: the exact solution of dx/dt = t x, x(t') = x exp((t'^2 - t^2) / 2)
    exact = x * torch.exp((t_next**2 - t**2) / 2).view(-1, 1, 1)
    target = objectives.jump_target(linear, x, t, t_next, 2000)
    assert torch.allclose(x + (t_next - t).view(-1, 1, 1) * target, exact, atol=1e-4)


def test_pick_segments_follows_the_weights():
    g = torch.Generator().manual_seed(0)
    assert objectives.pick_segments(4, 64, g, [0, 0, 1, 0]).tolist() == [2] * 64
    counts = torch.bincount(objectives.pick_segments(4, 20000, g, [0.4, 0.3, 0.2, 0.1]), minlength=4) / 20000
    assert torch.allclose(counts, torch.tensor([0.4, 0.3, 0.2, 0.1]), atol=0.015)
    uniform = objectives.pick_segments(4, 20000, g)  # no weights: every segment as often
    assert torch.allclose(torch.bincount(uniform, minlength=4) / 20000, torch.full((4,), 0.25), atol=0.015)


def test_schedule_segments_are_the_sampler_schedules_steps():
    unshifted = objectives.schedule_segments([1, 2], 16, shift=False)
    assert unshifted == [([1.0], 0.0), ([1.0], 0.5), ([1.0, 0.5], 0.0)]
    schedule = get_schedule(4, 16, shift=True)  # what the pipeline samples a shifted 4-step model on
    shifted = objectives.schedule_segments([4], 16, shift=True)
    assert [path for path, _ in shifted] == [schedule[:k + 1] for k in range(4)]
    assert [end for _, end in shifted] == schedule[1:] and schedule[1] > 0.75


def test_own_steps_take_each_sample_along_its_schedule_path_from_its_noise():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 2, 4, generator=g)
    paths = [[1.0], [1.0, 0.75], [1.0, 0.75, 0.5, 0.25]]
    calls = []

    def velocity(x, t, rows):  # v = t x, and which rows each step ran
        calls.append(rows.tolist())
        return x * t.view(-1, 1, 1)

    x = objectives.own_steps(velocity, noise, paths)
    assert torch.equal(x[0], noise[0])  # at t = 1 the sampler's input is the noise itself
    assert calls == [[1, 2], [2], [2]]  # the rows still on their way: finished ones run no more forwards
    expected = noise[2].clone()
    for a, b in zip(paths[2][:-1], paths[2][1:]):  # the sampler's Euler steps, one by one
        expected = expected + (b - a) * expected * a
    assert torch.allclose(x[2], expected, atol=1e-6)
    assert torch.allclose(x[1], noise[1] * (1 - 0.25), atol=1e-6)


def test_vae_loss_is_zero_for_a_perfect_reconstruction_with_a_standard_posterior():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    total, parts = objectives.vae_loss(x, x.clone(), torch.zeros(2, 4, 1, 1), torch.zeros(2, 4, 1, 1))
    assert total.item() == 0 and set(parts) == {"l1", "mse", "kl"}
    _, parts = objectives.vae_loss(x, x, torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
    assert parts["kl"].item() == pytest.approx(0.5)


# -- students start where their teachers are ------------------------------------------------------------------------
def _forward(model: Flux, guidance: float | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    B, p = 2, model.params
    img, txt = torch.randn(B, 4, p.in_channels, generator=g), torch.randn(B, 6, p.context_in_dim, generator=g)
    ids = torch.zeros(B, 4, 3)
    ids[:, :, 1] = torch.arange(4)
    gvec = torch.full((B,), guidance) if guidance is not None else None
    with torch.no_grad():
        return model(img, ids, txt, torch.zeros(B, 6, 3), torch.tensor([0.3, 0.8]),
                     torch.randn(B, p.vec_in_dim, generator=g), guidance=gvec)


def _debug(guidance: bool, seed: int) -> Flux:
    torch.manual_seed(seed)
    model = Flux(FluxParams(**{**_DEBUG, "guidance_embed": guidance})).initialize_weights()
    with torch.no_grad():  # adaLN-Zero makes a fresh model output zeros; give it a non-trivial function
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


_DEBUG = dict(vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1,
              axes_dim=[4, 14, 14])


def test_guidance_student_starts_equal_to_its_teacher():
    teacher = _debug(False, 0)
    student = init_from(Flux(FluxParams(**{**_DEBUG, "guidance_embed": True})).initialize_weights(), teacher)
    for w in (1.0, 4.5):
        assert torch.equal(_forward(student, w), _forward(teacher))


def test_fewstep_student_starts_equal_to_dev_at_the_folded_guidance():
    dev = _debug(True, 1)
    student = init_from(Flux(FluxParams(**{**_DEBUG, "guidance_embed": False})), dev, fold_guidance=3.5)
    assert torch.allclose(_forward(student), _forward(dev, 3.5), atol=1e-5)
    assert not torch.allclose(_forward(student), _forward(dev, 1.0), atol=1e-3)
    with pytest.raises(ConfigError, match="init_guidance"):
        init_from(Flux(FluxParams(**{**_DEBUG, "guidance_embed": False})), dev)


def test_a_deeper_model_grows_from_its_source_and_starts_equal_to_it():
    source = _debug(False, 0)
    grown = init_from(Flux(FluxParams(**{**_DEBUG, "guidance_embed": False, "depth": 2,
                                         "depth_single_blocks": 2})).initialize_weights(), source)
    assert torch.allclose(_forward(grown), _forward(source), atol=1e-6)
    assert torch.equal(grown.double_blocks[0].img_attn.qkv.weight, source.double_blocks[0].img_attn.qkv.weight)
    with pytest.raises(CheckpointError, match="unexpected key"):  # shrinking would drop trained blocks
        init_from(Flux(FluxParams(**{**_DEBUG, "guidance_embed": False})), grown)


# -- plumbing -------------------------------------------------------------------------------------------------------
def test_batch_stream_resumes_mid_epoch():
    ds = ShapesDataset(seed=0, length=30, buckets=[(32, 32), (32, 48), (48, 32)])
    straight = BatchStream(ds, 3, seed=5)
    expected = [next(straight) for _ in range(25)]  # 9 batches per epoch
    first = BatchStream(ds, 3, seed=5)
    head = [next(first) for _ in range(11)]
    second = BatchStream(ds, 3, seed=5)
    second.load_state(first.state())
    assert head + [next(second) for _ in range(14)] == expected
    assert all(len({i % 3 for i in b}) == 1 for b in expected)


def test_feature_cache_holds_the_vae_latents_and_minilm_states(root, pro_run, ae_path):
    from fluxion.text import load_minilm

    caches = [FeatureCache.from_tensors(load_state_dict(p)) for p in (root / "cache").glob("features-*.safetensors")]
    (cache,) = [c for c in caches if len(c.caption_ids) == 24]  # the one of the 24-image recipes
    ds = ShapesDataset(seed=0, length=24, buckets=[tuple(b) for b in BUCKETS])
    ae, text = load_autoencoder(ae_path), load_minilm(max_length=24)
    assert cache.text_length == 24
    for i in (5, 12):
        latents, txt, vec = cache.batch([i])
        image, caption = ds[i]
        with torch.no_grad():
            assert torch.allclose(latents, ae.encode(image[None]), atol=1e-5)
        ref_txt, ref_vec = text.encode([caption])
        assert torch.allclose(txt, ref_txt, atol=1e-5) and torch.allclose(vec, ref_vec, atol=1e-5)


def test_training_batches_number_the_caption_tokens_as_configured(root, pro_run):
    from fluxion.training.stages import FlowStage

    cfg = load_config(root / "pro.toml")
    batch = FlowStage(cfg, torch.device("cpu")).next_batch()
    assert batch.txt_ids[..., 0].tolist() == [list(range(24))] * len(batch) and not batch.txt_ids[..., 1:].any()
    cfg.model.text_positions = False
    assert not FlowStage(cfg, torch.device("cpu")).next_batch().txt_ids.any()


def test_ema_follows_the_model_with_a_ramped_decay():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the first update mostly copies
    with torch.no_grad():
        model.weight.fill_(1.0)
    before = ema.model.weight.clone()
    ema.update(model)
    assert torch.allclose(ema.model.weight, before + 0.9 * (1.0 - before))
    ema.updates = 1000
    assert ema.current_decay() == 0.9


def test_learning_rate_warms_up_then_decays_to_the_floor():
    o = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [learning_rate(s, o, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(19, o, 20) == pytest.approx(0.1)
    assert learning_rate(5, OptimConfig(lr=2.0), 20) == 2.0


def test_feature_cache_key_follows_the_layout(tmp_path):
    vae = tmp_path / "ae.safetensors"
    vae.write_bytes(b"weights")

    class Text:
        max_length, context_dim = 24, 384

    keys = {layout: cache_key(vae, ShapesDataset(seed=0, length=8, layout=layout), Text()) for layout in LAYOUTS}
    assert keys["spread"] != keys["halves"]
    assert keys["spread"] == cache_key(vae, ShapesDataset(seed=0, length=8), Text())


def test_a_cache_with_other_captions_reuses_the_latents_of_the_same_images(tmp_path, ae_path, monkeypatch):
    """Changing only how the images are captioned encodes the captions again, not the images."""
    from fluxion.text import load_minilm
    from fluxion.training import batches

    vae = load_autoencoder(ae_path, dtype=torch.float32)
    text = load_minilm(max_length=24)

    def cache(dataset, encode_calls: list) -> FeatureCache:
        real = vae.encode
        monkeypatch.setattr(vae, "encode", lambda x: encode_calls.append(len(x)) or real(x))
        return batches.load_or_build_feature_cache(tmp_path, ae_path, dataset, vae, text, torch.device("cpu"),
                                                   progress=False)

    def dataset(**captions) -> ShapesDataset:
        return ShapesDataset(seed=3, length=6, buckets=[(32, 32), (32, 48)], **captions)

    first_calls, again_calls, other_calls = [], [], []
    templates = cache(dataset(), first_calls)
    varied = cache(dataset(captions="varied", captions_per_image=2), again_calls)
    assert sum(first_calls) == 6 and again_calls == []  # the second cache encoded no image
    assert all(torch.equal(a, b) for a, b in zip(templates.latents, varied.latents))
    assert templates.caption_ids.shape == (6,) and varied.caption_ids.shape == (6, 2)  # its own captions
    cache(ShapesDataset(seed=4, length=6, buckets=[(32, 32), (32, 48)]), other_calls)
    assert sum(other_calls) == 6  # other scenes: their own images
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 3


# -- LoRA: teaching the held-out star to a frozen model -----------------------------------------------------------
def lora_recipe(root: Path, ae: Path, base: Path, **objective) -> dict:
    recipe = flux_recipe(root, ae, "star", "lora", "dev", steps=4, guidance=True, model={"init_from": str(base)},
                         objective={"rank": 4, "alpha": 2.0, "targets": ["attention", "modulation", "img_in"],
                                    **objective})
    recipe["data"] |= {"num_images": 8, "buckets": [[32, 32]], "shapes": ["star", "circle", "square", "triangle"],
                       "teach": "star", "cache_dir": str(root / "lora-cache")}
    recipe["export"] |= {"layouts": ["peft", "kohya", "comfy"], "dir": str(root / "never-written")}
    recipe["log"]["sample_prompts"] = ["a red star"]
    return recipe


@pytest.fixture(scope="module")
def lora_run(root, ae_path, dev_run) -> Path:
    """`fluxion train RECIPE --out-dir DIR`: the run goes to DIR, the recipe's export.dir is skipped."""
    from fluxion.cli import main

    base = dev_run / "model" / "transformer.safetensors"
    recipe = write_recipe(root / "star.toml", lora_recipe(root, ae_path, base))
    assert main(["train", str(recipe), "--out-dir", str(root / "star-run")]) == 0
    assert not (root / "never-written").exists() and not (root / "star").exists()
    return root / "star-run"


def test_lora_stage_trains_only_the_adapter_and_writes_every_layout(lora_run, dev_run):
    from fluxion.lora import load_lora, unload_loras

    state, meta = checkpoint_state(lora_run)
    assert meta["step"] == 4  # and no weight of the frozen base:
    assert all(k.startswith(("model.down.", "model.up.", "ema.down.", "ema.up.", "optim.", "rng.")) for k in state)
    base = load_transformer(dev_run / "model" / "transformer.safetensors")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x, ids, txt = torch.randn(1, 4, 64), torch.zeros(1, 4, 3), torch.randn(1, 24, 384)
    inputs = dict(img=x, img_ids=ids, txt=txt, txt_ids=torch.zeros(1, 24, 3), timesteps=torch.tensor([0.5]),
                  y=torch.randn(1, 384), guidance=torch.tensor([3.5]))
    with torch.no_grad():
        plain = base(**inputs)
        outputs = []
        for suffix in ("", "-kohya", "-comfy"):
            path = lora_run / "model" / f"star{suffix}.safetensors"
            assert read_checkpoint_info(path).metadata["fluxion.base_model"] == "dev"
            load_lora(base, path, name="star")
            outputs.append(base(**inputs))
            unload_loras(base)
    assert (outputs[0] - plain).abs().max() > 1e-6  # the adapter learned something: up left zero
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # the base file is untouched


def test_lora_batches_pair_every_image_with_its_own_caption(root, lora_run):
    """Shuffled bucketed batches read latents and caption states by sample id: each row is that sample's."""
    from fluxion.text import load_minilm
    from fluxion.training.stages import LoRAStage

    stage = LoRAStage(load_config(root / "star.toml"), torch.device("cpu"))
    ds, text = stage.dataset, load_minilm(max_length=24)
    seen = []
    for _ in range(2):
        indices = next(stage.batches)
        seen.append(indices)
        latents, txt, vec = stage.features.batch(indices)
        images, captions = collate([ds[i] for i in indices])
        assert all("star" in c for c in captions)
        with torch.no_grad():
            torch.testing.assert_close(latents, stage.autoencoder.encode(images), atol=1e-5, rtol=1e-5)
        ref_txt, ref_vec = text.encode(captions)
        torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vec, ref_vec, atol=1e-5, rtol=1e-5)
    assert seen[0] != sorted(seen[0]) or seen[1] != sorted(seen[1])  # the order really was shuffled


def test_lora_targets_name_groups_or_patterns(tmp_path, dev_run):
    from fluxion.training.adapter import LoRAWeights, target_modules

    base = load_transformer(dev_run / "model" / "transformer.safetensors")
    assert target_modules(base, ["img_in", "double_blocks.0.img_attn.*"]) == [
        "img_in", "double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj"]
    assert "final_layer.adaLN_modulation.1" in target_modules(base, ["modulation"])
    with pytest.raises(ConfigError, match="'norm1' selects no Linear"):
        target_modules(base, ["norm1"])
    weights = LoRAWeights(base, ["attention"], rank=4, alpha=8.0)
    update = weights.adapter("x").updates["single_blocks.0.linear1"]
    assert update.scale == 2.0 and not update.up.any() and update.down.shape == (4, base.params.hidden_size)


def test_text_mixup_blends_each_caption_with_another_of_the_batch(root, pro_run, tmp_path):
    from fluxion.training.stages import FlowStage

    stage = FlowStage(load_config(root / "pro.toml"), torch.device("cpu"))
    b = stage.next_batch()
    g = torch.Generator().manual_seed(0)
    assert stage.mix_texts(b.txt, b.vec, 0.0, g) == (b.txt, b.vec)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # off: no draw, no change
    txt, vec = stage.mix_texts(b.txt, b.vec, 0.4, g)
    assert not torch.equal(txt, b.txt)
    for i in range(len(b)):  # row i = (1 - w) own + w other, one w for its states and its pooled vector
        fits = []
        for j in range(len(b)):
            d = (b.vec[j] - b.vec[i]).flatten()
            w = float((vec[i] - b.vec[i]).flatten() @ d / d.square().sum()) if d.any() else 0.0
            fits.append((float((torch.lerp(b.txt[i], b.txt[j], w) - txt[i]).abs().max()), w))
        err, w = min(fits)
        assert err < 1e-5 and -1e-6 <= w <= 0.4 + 1e-6
    recipe = tomllib.loads((root / "pro.toml").read_text())
    recipe["objective"]["text_mixup"] = 1.0
    with pytest.raises(ConfigError, match="objective.text_mixup"):
        load_config(write_recipe(tmp_path / "mix.toml", recipe))
