"""The server's parts without HTTP or models: the SQLite job store and its restart rule, keys, rate limits, path
containment, signed URLs, request checks that name the parameter, and the config's refusals."""

import os
import sqlite3
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from fluxion.errors import InputError
from fluxion.server import jobs as states
from fluxion.server.config import ServerConfig
from fluxion.server.errors import APIError, input_error
from fluxion.server.jobs import Job, JobStore
from fluxion.server.loras import resolve_loras
from fluxion.server.models import ModelInfo
from fluxion.server.security import KeyRing, RateLimiter, URLSigner, contained, hash_key
from fluxion.server.specs import SpecLimits, build_spec


def job(**kw) -> Job:
    return Job(**{"id": Job.new_id(), "api": "bfl", "model": "tiny-schnell", "spec": {"prompt": "x"},
                  "batch_key": "k", "num_images": 1, **kw})


def test_store_is_wal_and_a_job_is_on_disk_once_inserted(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    j, created = store.insert(job())
    assert created
    other = sqlite3.connect(tmp_path / "jobs.sqlite3")  # another connection (another process) sees it committed
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("SELECT state FROM jobs WHERE id = ?", (j.id,)).fetchone()[0] == states.PENDING
    assert store.get(j.id).spec == {"prompt": "x"}


def test_idempotency_key_returns_the_same_job_per_owner(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    first, _ = store.insert(job(idempotency_key="abc", owner="k1"))
    again, created = store.insert(job(idempotency_key="abc", owner="k1"))
    assert (again.id, created) == (first.id, False)
    _, created = store.insert(job(idempotency_key="abc", owner="k2"))  # another key's namespace
    assert created


def test_transitions_and_cancel(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    a, _ = store.insert(job())
    b, _ = store.insert(job())
    assert store.cancel(b.id) and store.get(b.id).state == states.CANCELLED
    assert store.start([a.id, b.id]) == [a.id]  # a cancelled job never starts
    assert store.get(a.id).attempts == 1
    assert store.cancel(a.id)  # a running job can be cancelled; the worker's finish then changes nothing
    assert not store.finish(a.id, [{"file": "0.png", "seed": 1}])
    assert store.get(a.id).state == states.CANCELLED
    assert not store.cancel(a.id)  # already ended


def test_restart_retries_an_interrupted_job_once_then_fails_it(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    j, _ = store.insert(job(webhook_url="http://127.0.0.1:9/hook"))
    store.start([j.id])
    store.close()
    store = JobStore(path)  # "restart" after a crash during the first run
    assert store.recover() == ([j.id], [])
    assert store.get(j.id).state == states.PENDING
    store.start([j.id])  # second run, interrupted again
    store.close()
    store = JobStore(path)
    assert store.recover() == ([], [j.id])
    failed = store.get(j.id)
    assert failed.state == states.ERROR and "interrupted twice" in failed.error and failed.attempts == 2
    assert failed.webhook_state == "due"  # its webhook still reports the failure


def test_a_clean_shutdown_requeues_without_spending_an_attempt(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    j, _ = store.insert(job())
    store.start([j.id])
    store.requeue([j.id])
    assert (store.get(j.id).state, store.get(j.id).attempts) == (states.PENDING, 0)


def test_expired_jobs_are_listed_for_deletion(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    j, _ = store.insert(job())
    store.start([j.id])
    store.finish(j.id, [])
    assert store.expired(time.time() + 1) == [j.id]
    store.delete(j.id)
    assert store.get(j.id) is None


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_results_carry_their_settings(fmt):
    import io

    from PIL import Image

    from fluxion.server.outputs import EXIF_IMAGE_DESCRIPTION, encode

    image = Image.new("RGB", (16, 16), (200, 10, 10))
    image.info["fluxion"] = '{"seed": 3}'
    back = Image.open(io.BytesIO(encode(image, fmt, 80)))
    assert back.format == fmt.upper()
    settings = back.info.get("fluxion") if fmt == "png" else back.getexif().get(EXIF_IMAGE_DESCRIPTION)
    assert settings == '{"seed": 3}'


def test_keys_are_compared_by_digest():
    ring = KeyRing([hash_key("secret-1"), hash_key("secret-2")])
    assert ring.owner("secret-2") == hash_key("secret-2")[7:23]
    assert ring.owner("secret-3") is None and ring.owner(None) is None
    config = ServerConfig(api_keys=["plain-key", hash_key("other")], data_dir="unused")
    assert all(k.startswith("sha256:") for k in config.api_keys) and "plain-key" not in repr(config)


def test_rate_limiter_token_bucket():
    limiter = RateLimiter(per_minute=60, burst=2)
    assert limiter.take("a") == 0 and limiter.take("a") == 0
    wait = limiter.take("a")
    assert 0 < wait <= 1.0
    assert limiter.take("b") == 0  # per key


@pytest.mark.parametrize("path", ["../x.safetensors", "/etc/passwd", "a/../../x", "~/x", "a\\..\\x", ""])
def test_paths_never_leave_their_folder(tmp_path, path):
    with pytest.raises(APIError) as e:
        contained(tmp_path, path, "lora[0].path")
    assert e.value.status == 400 and e.value.param == "lora[0].path"


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    with pytest.raises(APIError) as e:
        resolve_loras([{"path": "link.safetensors"}], tmp_path / "adapters")
    assert e.value.code == "path_not_allowed"


def test_lora_names_and_paths(tmp_path):
    assert resolve_loras([{"name": "star", "scale": 0.5}], tmp_path)[0]["scale"] == 0.5
    for bad, param in (([{"name": "../star"}], "lora[0].name"), ([{"name": "star", "scale": 99}], "lora[0].scale"),
                       ([{"name": "star", "path": "x"}], "lora[0]")):
        with pytest.raises(APIError) as e:
            resolve_loras(bad, tmp_path)
        assert e.value.param == param
    with pytest.raises(APIError) as e:
        resolve_loras([{"name": "no-such-adapter"}], tmp_path)
    assert e.value.status == 404


def test_signed_urls(tmp_path):
    signer = URLSigner(tmp_path / "key")
    url = signer.sign("/v1/files/a/0.png", 60)
    path, query = url.split("?")
    params = dict(p.split("=") for p in query.split("&"))
    assert signer.verify(path, params["exp"], params["sig"])
    assert not signer.verify("/v1/files/b/0.png", params["exp"], params["sig"])
    assert not signer.verify(path, str(int(time.time()) - 1), signer.signature(path, int(time.time()) - 1))
    assert URLSigner(tmp_path / "key").secret == signer.secret  # kept across restarts


LIMITS = SpecLimits(max_prompt_chars=100, max_steps=8, max_images=10)


@pytest.fixture(scope="module")
def schnell_info():
    return ModelInfo.from_files("tiny-schnell")  # header and manifest only: no weights loaded


@pytest.mark.parametrize("fields,param,words", [
    ({"prompt": "x", "steps": 0}, "steps", "steps: expected an integer from 1 to 8, got 0"),
    ({"prompt": "x", "n": 11}, "n", "n: expected an integer from 1 to 10"),
    ({"prompt": "x" * 101}, "prompt", "at most 100 characters"),
    ({}, "prompt", "required"),
    ({"prompt": 3}, "prompt", "expected a string"),
    ({"prompt": "x", "width": 64, "height": 4096}, "size", "tiny-schnell supports 64 to 128 px"),
    ({"prompt": "x", "width": 70, "height": 64}, "size", "multiple of 16"),
    ({"prompt": "x", "seed": -1}, "seed", "seed: expected an integer"),
    ({"prompt": "x", "guidance": float("nan")}, "guidance", "guidance"),
    ({"prompt": "x", "output_format": "gif"}, "output_format", "png, jpeg, webp"),
])
def test_request_checks_name_the_parameter(schnell_info, fields, param, words):
    with pytest.raises(APIError) as e:
        build_spec(fields, model="tiny-schnell", info=schnell_info, limits=LIMITS)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message, e.value.message


def test_a_spec_fixes_its_seeds_and_defaults(schnell_info):
    spec = build_spec({"prompt": "x", "n": 3}, model="tiny-schnell", info=schnell_info, limits=LIMITS)
    assert len(spec.seeds) == 3 and spec.seeds == list(range(spec.seeds[0], spec.seeds[0] + 3))
    assert (spec.width, spec.height, spec.steps, spec.guidance) == (64, 64, 4, None)
    same = build_spec({"prompt": "y", "seed": 9}, model="tiny-schnell", info=schnell_info, limits=LIMITS)
    other = build_spec({"prompt": "y", "seed": 9, "steps": 2}, model="tiny-schnell", info=schnell_info, limits=LIMITS)
    assert spec.batch_key() == same.batch_key() != other.batch_key()


def test_input_error_names_map_to_api_params():
    error = input_error(InputError("num_inference_steps (--steps): expected an integer from 1 to 1000, got 0"))
    assert (error.param, error.message) == ("steps", "steps: expected an integer from 1 to 1000, got 0")


@pytest.mark.parametrize("kw,flag", [({"max_batch": 0}, "--max-batch"), ({"port": 70000}, "--port"),
                                     ({"models": []}, "--model"), ({"api_keys": ["a b"]}, "--api-key"),
                                     ({"cache": "nope"}, "--cache"), ({"api_keys": ["sha256:xyz"]}, "--api-key")])
def test_config_refusals_name_the_flag(tmp_path, kw, flag):
    with pytest.raises(InputError, match=flag):
        ServerConfig(data_dir=tmp_path, **kw)
