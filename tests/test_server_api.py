"""The server as clients see it: a live `fluxion serve` on a local port, called with the real `openai` client
(generations, edits, streaming, errors) and with httpx in the BFL shape (polling, samples, webhooks), plus
idempotency, cancellation, batching and LoRA isolation checked bit for bit against the plain pipeline."""

import base64
import hashlib
import hmac
import io
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from fluxion.pipeline import Pipeline
from server_fixtures import LiveServer, one_thread, wait_until  # noqa: F401  (fixture)

KEY, OTHER_KEY = "test-key-1", "test-key-2"
STEPS = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(tmp_path_factory.mktemp("server"), "--model", "tiny-schnell", "--model", "tiny-dev",
                      "--api-key", KEY, "--api-key", OTHER_KEY, "--max-batch", 8, "--batch-wait-ms", 300,
                      "--max-body-bytes", 300_000, "--max-prompt-chars", 500, "--max-steps", 12,
                      "--webhook-backoff", 0.2, "--workers", 2).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def schnell(one_thread):  # noqa: F811
    return Pipeline.from_pretrained("tiny-schnell")


def headers(key=KEY, **extra):
    return {"Authorization": f"Bearer {key}", **extra}


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def same(image: Image.Image, reference: Image.Image) -> bool:
    return np.array_equal(np.asarray(image.convert("RGB")), np.asarray(reference.convert("RGB")))


def generate(client, prompt, seed, model="tiny-schnell", **extra):
    return client.images.generate(model=model, prompt=prompt, size="64x64",
                                  extra_body={"seed": seed, "steps": STEPS, **extra})


def test_generate_with_the_openai_client_matches_the_pipeline(client, schnell, server):
    result = client.images.generate(model="tiny-schnell", prompt="a red circle", n=2, size="64x64",
                                    extra_body={"seed": 7, "steps": STEPS})
    assert len(result.data) == 2 and result.size == "64x64" and result.output_format == "png"
    for image, seed in zip(result.data, (7, 8)):
        png = decode(image.b64_json)
        reference = schnell("a red circle", seed=seed, height=64, width=64, num_inference_steps=STEPS)[0]
        assert same(png, reference)
        assert json.loads(png.info["fluxion"])["seed"] == seed  # the settings travel in the PNG
    # the url form: a signed link that needs no key, the same image bytes
    linked = client.images.generate(model="tiny-schnell", prompt="a red circle", size="64x64",
                                    response_format="url", extra_body={"seed": 7, "steps": STEPS})
    answer = httpx.get(linked.data[0].url)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert answer.content == base64.b64decode(result.data[0].b64_json)
    tampered = httpx.get(linked.data[0].url.replace("sig=", "sig=0"))
    assert tampered.status_code == 403 and tampered.json()["error"]["code"] == "invalid_signature"


def test_concurrent_requests_share_batches_and_stay_bit_exact(client, schnell, server):
    before = _metric(server, "fluxion_batch_size_count")
    prompts = ["a red circle", "two blue squares", "a green triangle", "a yellow circle", "a purple square",
               "an orange triangle"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda i: generate(client, prompts[i], 100 + i), range(len(prompts))))
    for i, result in enumerate(results):
        reference = schnell(prompts[i], seed=100 + i, height=64, width=64, num_inference_steps=STEPS)[0]
        assert same(decode(result.data[0].b64_json), reference), prompts[i]
    groups = _metric(server, "fluxion_batch_size_count") - before
    assert groups < len(prompts), "concurrent compatible requests should share forward passes"


def test_lora_requests_interleaved_with_plain_ones_do_not_leak(client, server, one_thread):  # noqa: F811
    requests = [(f"a red circle {i}", 200 + i, [{"name": "star", "scale": 0.9}] if i % 2 else None)
                for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda r: generate(client, r[0], r[1], model="tiny-dev", lora=r[2]), requests))
    reference = Pipeline.from_pretrained("tiny-dev")
    plain = {seed: reference(p, seed=seed, height=64, width=64, num_inference_steps=STEPS)[0]
             for p, seed, lora in requests if not lora}
    reference.load_lora("star", scale=0.9)
    starred = {seed: reference(p, seed=seed, height=64, width=64, num_inference_steps=STEPS)[0]
               for p, seed, lora in requests if lora}
    for (prompt, seed, lora), result in zip(requests, results):
        image = decode(result.data[0].b64_json)
        assert same(image, (starred if lora else plain)[seed]), (prompt, lora)
        assert bool(json.loads(image.info["fluxion"])["loras"]) == bool(lora)


def test_edit_with_a_transparent_mask_redoes_that_area(client, schnell):
    source = Image.new("RGB", (64, 64), (30, 120, 200))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # transparent left half: the area to redo

    def png(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    result = client.images.edit(model="tiny-schnell", image=("in.png", png(source), "image/png"),
                                mask=("mask.png", png(mask), "image/png"), prompt="a red circle", size="64x64",
                                extra_body={"seed": 3, "steps": STEPS})
    white_left = Image.new("L", (64, 64), 0)
    white_left.paste(255, (0, 0, 32, 64))
    reference = schnell("a red circle", seed=3, height=64, width=64, num_inference_steps=STEPS, image=source,
                        mask_image=white_left)[0]
    assert same(decode(result.data[0].b64_json), reference)


def test_streaming_sends_step_previews_then_the_image(client):
    events = list(client.images.generate(model="tiny-schnell", prompt="a blue square", size="64x64", stream=True,
                                         partial_images=2, extra_body={"seed": 5, "steps": 4}))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert decode(events[0].b64_json).size == (64, 64)
    final = client.images.generate(model="tiny-schnell", prompt="a blue square", size="64x64",
                                   extra_body={"seed": 5, "steps": 4})
    assert events[-1].b64_json == final.data[0].b64_json


def test_errors_have_the_openai_shape_and_status(client, server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="flux-pro", prompt="x")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="tiny-schnell", prompt="x", extra_body={"steps": 0})
    assert e.value.body["param"] == "steps" and "steps: expected an integer from 1 to 12" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="tiny-schnell", prompt="x" * 501)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="tiny-schnell", prompt="x", size="1024x1024")
    assert e.value.body["param"] == "size" and "supports 64 to 128 px" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="tiny-dev", prompt="x", extra_body={"lora": [{"path": "../../etc/passwd"}]})
    assert e.value.body["param"] == "lora[0].path" and e.value.body["code"] == "path_not_allowed"
    big = httpx.post(server.url + "/v1/images/generations", headers=headers(),
                     json={"prompt": "x", "padding": "y" * 400_000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    missing = httpx.get(server.url + "/v1/nothing/here", headers=headers())
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_healthz_and_metrics(server):
    health = httpx.get(server.url + "/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert "tiny-schnell" in health.json()["models"]["loaded"]
    assert httpx.get(server.url + "/metrics").status_code == 401
    text = httpx.get(server.url + "/metrics", headers=headers()).text
    for name in ("fluxion_queue_depth", "fluxion_job_latency_seconds_bucket", "fluxion_images_per_second",
                 "fluxion_batch_size_bucket", "fluxion_images_generated_total", "fluxion_http_requests_total"):
        assert f"\n{name}" in text, name


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers=headers()).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def _poll(server, job_id: str, key=KEY) -> dict:
    return wait_until(lambda: (lambda r: r if r["status"] not in ("Pending",) else None)(
        httpx.get(server.url + "/v1/get_result", params={"id": job_id}, headers={"x-key": key}).json()),
        what=f"job {job_id}")


def test_bfl_submit_poll_and_sample(server, schnell):
    submitted = httpx.post(server.url + "/v1/tiny-schnell", headers={"x-key": KEY},
                           json={"prompt": "a green triangle", "width": 64, "height": 64, "steps": STEPS, "seed": 4,
                                 "output_format": "png"}).json()
    assert set(submitted) == {"id", "polling_url"} and submitted["id"] in submitted["polling_url"]
    result = _poll(server, submitted["id"])
    assert result["status"] == "Ready" and result["result"]["seed"] == 4
    sample = httpx.get(result["result"]["sample"])
    reference = schnell("a green triangle", seed=4, height=64, width=64, num_inference_steps=STEPS)[0]
    assert same(Image.open(io.BytesIO(sample.content)), reference)
    # another key cannot see it; an unknown id is "Task not found"
    hidden = httpx.get(server.url + "/v1/get_result", params={"id": submitted["id"]}, headers={"x-key": OTHER_KEY})
    assert hidden.json()["status"] == "Task not found"
    assert httpx.get(server.url + "/v1/get_result", params={"id": "nope"},
                     headers={"x-key": KEY}).json()["status"] == "Task not found"
    bad = httpx.post(server.url + "/v1/tiny-schnell", headers={"x-key": KEY}, json={"prompt": "x", "width": 65})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "width"


class _Hooks(BaseHTTPRequestHandler):
    calls: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls.append((body, dict(self.headers)))
        self.send_response(500 if len(type(self).calls) == 1 else 200)  # the first delivery fails
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_is_retried_until_delivered(server):
    hooks = HTTPServer(("127.0.0.1", 0), _Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{hooks.server_address[1]}/done"
        job = httpx.post(server.url + "/v1/tiny-schnell", headers={"x-key": KEY},
                         json={"prompt": "a circle", "width": 64, "height": 64, "steps": 1, "webhook_url": url,
                               "webhook_secret": "s3cret"}).json()
        wait_until(lambda: len(_Hooks.calls) >= 2, timeout=60, what="the webhook's retry")
        body, sent = _Hooks.calls[-1]
        payload = json.loads(body)
        assert payload["id"] == job["id"] and payload["status"] == "Ready" and payload["result"]["sample"]
        expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        assert sent["X-Fluxion-Signature"] == f"sha256={expected}"
    finally:
        hooks.shutdown()


def test_idempotency_key_returns_the_same_job(server, client):
    body = {"prompt": "a square", "width": 64, "height": 64, "steps": 1}
    first = httpx.post(server.url + "/v1/tiny-schnell", headers={"x-key": KEY, "Idempotency-Key": "k-1"}, json=body)
    again = httpx.post(server.url + "/v1/tiny-schnell", headers={"x-key": KEY, "Idempotency-Key": "k-1"}, json=body)
    assert first.json()["id"] == again.json()["id"]
    changed = httpx.post(server.url + "/v1/tiny-schnell", headers={"x-key": KEY, "Idempotency-Key": "k-1"},
                         json={**body, "prompt": "another"})
    assert changed.status_code == 409 and changed.json()["error"]["code"] == "idempotency_key_reused"
    # without a seed, the repeat is still the same job, hence the same (randomly seeded) image
    a = client.images.generate(model="tiny-schnell", prompt="a dot", size="64x64", extra_body={"steps": 1},
                               extra_headers={"Idempotency-Key": "k-2"})
    b = client.images.generate(model="tiny-schnell", prompt="a dot", size="64x64", extra_body={"steps": 1},
                               extra_headers={"Idempotency-Key": "k-2"})
    assert a.id == b.id and a.data[0].b64_json == b.data[0].b64_json


def test_cancel_a_running_and_a_pending_job(server):
    def submit(steps, n=1):
        return httpx.post(server.url + "/v1/images/generations", headers=headers(), timeout=120,
                          json={"prompt": "a long job", "size": "64x64", "n": n, "steps": steps})

    def state(job_id):
        return httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=headers()).json()

    with ThreadPoolExecutor(2) as pool:  # synchronous requests: their answers come when the jobs end
        long = pool.submit(submit, 12, 10)
        running = wait_until(lambda: next((j for j in _recent_jobs(server) if j["state"] == "running"), None),
                             what="the long job to run")
        queued = pool.submit(submit, 11)
        pending = wait_until(lambda: next((j for j in _recent_jobs(server) if j["state"] == "pending"), None),
                             what="a pending job")
        assert httpx.delete(f"{server.url}/v1/jobs/{pending['id']}", headers=headers()).json()["state"] == "cancelled"
        assert httpx.delete(f"{server.url}/v1/jobs/{running['id']}", headers=headers()).json()["state"] == "cancelled"
        assert long.result().status_code == 409 and long.result().json()["error"]["code"] == "job_cancelled"
        assert queued.result().status_code == 409
    assert state(running["id"])["results"] is None and state(pending["id"])["state"] == "cancelled"
    again = httpx.delete(f"{server.url}/v1/jobs/{running['id']}", headers=headers())
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    assert httpx.delete(f"{server.url}/v1/jobs/{running['id']}", headers=headers(OTHER_KEY)).status_code == 404


def _recent_jobs(server) -> list[dict]:
    """The jobs table, read directly (tests only): id and state, newest first."""
    import sqlite3

    db = sqlite3.connect(server.data_dir / "jobs.sqlite3")
    try:
        rows = db.execute("SELECT id, state FROM jobs ORDER BY created_at DESC LIMIT 5").fetchall()
    finally:
        db.close()
    return [{"id": i, "state": s} for i, s in rows]
