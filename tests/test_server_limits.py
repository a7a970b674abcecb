"""Refusals that need a server in a given state, run in-process (fastapi's TestClient): 503 while the model loads,
429 with Retry-After when the queue is full or a key's rate is spent, and `fluxion serve`'s one-line errors."""

import os
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from fastapi.testclient import TestClient

from fluxion.server.app import create_app
from fluxion.server.config import ServerConfig
from fluxion.server.engine import Engine
from fluxion.server.models import load_pipeline
from server_fixtures import wait_until

JOB = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 1}


def gated_loader(gate: threading.Event):
    """Loads tiny-schnell once `gate` is set: the model is "loading" until then."""
    def load(name):
        gate.wait(60)
        return load_pipeline(name)
    return load


def app_with(tmp_path, gate, **kw):
    config = ServerConfig(data_dir=tmp_path, **kw)
    return create_app(config, Engine(config, loader=gated_loader(gate)))


def test_503_while_the_model_loads(tmp_path):
    gate = threading.Event()
    with TestClient(app_with(tmp_path, gate)) as client:
        health = client.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        answer = client.post("/v1/tiny-schnell", json=JOB)
        assert answer.status_code == 503 and int(answer.headers["Retry-After"]) >= 1
        assert answer.json()["error"]["code"] == "model_loading"
        gate.set()
        wait_until(lambda: client.get("/healthz").status_code == 200, what="the model to load")
        assert client.post("/v1/tiny-schnell", json=JOB).status_code == 200


def test_429_with_retry_after_when_the_queue_is_full(tmp_path):
    gate = threading.Event()
    with TestClient(app_with(tmp_path, gate, preload=False, queue_size=2, batch_wait_ms=0)) as client:
        first = client.post("/v1/tiny-schnell", json=JOB).json()["id"]
        wait_until(lambda: client.get(f"/v1/jobs/{first}").json()["state"] == "running", what="the first job")
        assert client.post("/v1/tiny-schnell", json={**JOB, "steps": 2}).status_code == 200
        full = client.post("/v1/tiny-schnell", json=JOB)
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
        assert full.json()["error"]["code"] == "queue_full" and full.json()["error"]["type"] == "rate_limit_error"
        gate.set()
        wait_until(lambda: client.get("/v1/get_result", params={"id": first}).json()["status"] == "Ready",
                   what="the queue to move")
        assert client.post("/v1/tiny-schnell", json=JOB).status_code == 200


def test_429_when_a_key_spends_its_rate(tmp_path):
    gate = threading.Event()
    gate.set()
    app = app_with(tmp_path, gate, preload=False, api_keys=["k1", "k2"], rate_limit=60, rate_burst=2)
    with TestClient(app) as client:
        k1, k2 = {"Authorization": "Bearer k1"}, {"x-key": "k2"}
        assert [client.get("/v1/models", headers=k1).status_code for _ in range(2)] == [200, 200]
        limited = client.get("/v1/models", headers=k1)
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert client.get("/v1/models", headers=k2).status_code == 200  # each key has its own bucket
        assert client.get("/v1/models").status_code == 401


def test_results_are_deleted_after_their_time(tmp_path):
    gate = threading.Event()
    gate.set()
    with TestClient(app_with(tmp_path, gate, preload=False, result_ttl_s=1)) as client:
        job = client.post("/v1/tiny-schnell", json=JOB).json()["id"]
        sample = wait_until(lambda: client.get("/v1/get_result", params={"id": job}).json()["result"],
                            what="the job")["sample"]
        assert client.get(sample.removeprefix("http://testserver")).status_code == 200
        wait_until(lambda: client.get("/v1/get_result", params={"id": job}).json()["status"] == "Task not found",
                   timeout=30, what="the job to expire")
        assert not (tmp_path / "results" / job).exists()
        assert client.get(sample.removeprefix("http://testserver")).status_code in (403, 404)  # link expired too


@pytest.mark.parametrize("args,words", [(["--max-batch", "0"], "--max-batch: expected an integer from 1"),
                                        (["--api-key-file", "no-such-file"], "--api-key-file: no such file")])
def test_serve_refuses_bad_flags_in_one_line(args, words, capsys):
    from fluxion.cli import main

    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fluxion serve: error: ") and words in err and len(err.strip().splitlines()) == 1
