"""kill -9 with jobs in flight, then a restart on the same data folder: every accepted job was on disk, the
interrupted one runs again (once), all finish exactly once, and their images are the ones the pipeline makes."""

import io
import os
import sqlite3

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np
from PIL import Image

from fluxion.pipeline import Pipeline
from server_fixtures import LiveServer, one_thread, wait_until  # noqa: F401  (fixture)

JOBS, MAX_BATCH, STEPS = 6, 2, 8


def rows(data_dir) -> dict[str, tuple[str, int]]:
    db = sqlite3.connect(data_dir / "jobs.sqlite3")
    try:
        return {i: (s, a) for i, s, a in db.execute("SELECT id, state, attempts FROM jobs")}
    finally:
        db.close()


def test_kill_9_with_jobs_in_flight_then_restart(tmp_path, one_thread):  # noqa: F811
    data = tmp_path / "data"
    first = LiveServer(data, "--max-batch", MAX_BATCH, "--batch-wait-ms", 0).start()
    try:
        ids = []
        for i in range(JOBS):
            answer = httpx.post(first.url + "/v1/tiny-schnell", timeout=30,
                                json={"prompt": f"a red circle {i}", "width": 64, "height": 64, "steps": STEPS,
                                      "seed": 10 * i, "output_format": "png"})
            assert answer.status_code == 200, answer.text
            ids.append(answer.json()["id"])
        wait_until(lambda: any(s == "running" for s, _ in rows(data).values()), interval=0.01,
                   what="a job to be running")
    finally:
        first.kill()
    at_kill = rows(data)
    assert set(ids) <= set(at_kill)  # every answered job was committed before its answer
    interrupted = [i for i, (s, _) in at_kill.items() if s == "running"]
    assert interrupted and any(s == "pending" for s, _ in at_kill.values()), at_kill

    second = LiveServer(data, "--max-batch", MAX_BATCH, "--batch-wait-ms", 0).start()
    try:
        def all_ready():
            states = [httpx.get(second.url + "/v1/get_result", params={"id": i}).json() for i in ids]
            return states if all(s["status"] == "Ready" for s in states) else None

        results = wait_until(all_ready, timeout=120, interval=0.2, what="every job to be ready")
        final = rows(data)
        for job_id in ids:
            state, attempts = final[job_id]
            assert state == "ready"
            assert attempts == (2 if job_id in interrupted else 1), (job_id, attempts)
            files = sorted(p.name for p in (data / "results" / job_id).iterdir())
            assert files == ["0.png"], files  # one image, no temp file left by the kill
        # the retried job's image is the one its seed gives
        index = ids.index(interrupted[0])
        sample = Image.open(io.BytesIO(httpx.get(results[index]["result"]["sample"]).content))
        reference = Pipeline.from_pretrained("tiny-schnell")(f"a red circle {index}", seed=10 * index, height=64,
                                                             width=64, num_inference_steps=STEPS)[0]
        assert np.array_equal(np.asarray(sample.convert("RGB")), np.asarray(reference))
    finally:
        second.stop()
