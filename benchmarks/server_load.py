"""Load test with a crash: --clients concurrent clients for --minutes against a real `fluxion serve` (tiny-schnell),
the server killed with SIGKILL at --kill-at of the run and restarted at once on the same data folder and port.

Clients use the BFL shape with an Idempotency-Key per job: submit (retried with the same key until the server
answers with the job's id: then, and only then, the job is *accepted*), then poll GET /v1/get_result until Ready,
retrying through the outage. After the run every client's jobs are drained, the server is stopped, and the SQLite
store and the result files are checked: no accepted job lost, each exactly once (one row per key, one image, no
stray files), every key still answering its own id, and the images of the jobs the kill interrupted (plus a sample
of the others) bit-identical to the plain pipeline's.

    python benchmarks/server_load.py --minutes 5 --clients 16 --json server_load.json
Exits 1 if a check fails."""

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from server_throughput import PROMPTS, free_port  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


class Server:
    """`fluxion serve` in a subprocess; the same port and data folder across restarts."""

    def __init__(self, args, data_dir: Path, port: int):
        self.args, self.data_dir, self.port = args, data_dir, port
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None
        self.log = open(data_dir / "server.log", "ab")

    def start(self) -> float:
        """Start and wait until /healthz answers 200; returns when it did (time.time())."""
        env = {**os.environ, "OMP_NUM_THREADS": str(self.args.threads), "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fluxion.cli", "serve", "--model", "tiny-schnell", "--port", str(self.port),
             "--data-dir", str(self.data_dir), "--max-batch", str(self.args.max_batch), "--queue-size", "1024"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return time.time()
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the server did not become ready")

    def kill(self) -> float:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        return time.time()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Ledger:
    """What the clients saw, shared by their threads."""

    accepted: dict[str, str] = field(default_factory=dict)  # idempotency key -> job id (the first answer)
    ids_per_key: dict[str, set] = field(default_factory=dict)  # every id answered for a key (must stay one)
    accepted_at: dict[str, float] = field(default_factory=dict)
    bodies: dict[str, dict] = field(default_factory=dict)  # key -> its request, sent again at the end
    ready_at: dict[str, float] = field(default_factory=dict)  # key -> when its client saw Ready
    ready_seen: dict[str, int] = field(default_factory=dict)  # key -> how often its client saw Ready
    errors: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)  # accepted ids the server said it did not know
    unanswered: int = 0  # submissions given up (no id ever answered): not accepted
    transport_retries: int = 0
    refused: int = 0  # 429 / 503 answers (retried)
    successes: list[float] = field(default_factory=list)  # when each HTTP exchange succeeded
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self) -> None:
        with self.lock:
            self.successes.append(time.time())


def client(index: int, url: str, args, ledger: Ledger, submit_until: float, give_up_at: float) -> None:
    rng = random.Random(index)
    with httpx.Client(base_url=url, timeout=30) as http:
        number = 0
        while time.time() < submit_until:
            key = f"load-{index}-{number}"
            number += 1
            body = {"prompt": rng.choice(PROMPTS), "seed": rng.randrange(2**31), "width": args.size,
                    "height": args.size, "steps": args.steps, "output_format": "png"}
            job_id = submit(http, key, body, ledger, give_up_at)
            if job_id is None:
                return
            poll(http, key, job_id, ledger, give_up_at)


def _retry(ledger: Ledger, answer: httpx.Response | None) -> None:
    with ledger.lock:
        if answer is None:
            ledger.transport_retries += 1
        else:
            ledger.refused += 1
    time.sleep(0.1 if answer is None else min(2.0, float(answer.headers.get("retry-after", 0.2))))


def answered(send, ledger: Ledger, give_up_at: float) -> httpx.Response | None:
    """send() until the server answers other than 429/503 (transport errors and refusals are counted and
    retried), or None at give_up_at."""
    while time.time() < give_up_at:
        try:
            answer = send()
        except httpx.TransportError:
            _retry(ledger, None)
            continue
        if answer.status_code in (429, 503):
            _retry(ledger, answer)
            continue
        ledger.ok()
        return answer
    return None


def submit(http: httpx.Client, key: str, body: dict, ledger: Ledger, give_up_at: float) -> str | None:
    """POST until the server answers an id (the same key: a lost answer's job is found, not made again)."""
    answer = answered(lambda: http.post("/v1/tiny-schnell", json=body, headers={"Idempotency-Key": key}), ledger,
                      give_up_at)
    if answer is None:
        with ledger.lock:
            ledger.unanswered += 1
        return None
    if answer.status_code != 200:
        with ledger.lock:
            ledger.errors.append(f"submit {key}: {answer.status_code} {answer.text[:200]}")
        return None
    job_id = answer.json()["id"]
    with ledger.lock:
        ledger.accepted.setdefault(key, job_id)
        ledger.ids_per_key.setdefault(key, set()).add(job_id)
        ledger.accepted_at.setdefault(key, time.time())
        ledger.bodies[key] = body
    return job_id


def poll(http: httpx.Client, key: str, job_id: str, ledger: Ledger, give_up_at: float) -> None:
    while (answer := answered(lambda: http.get("/v1/get_result", params={"id": job_id}), ledger,
                              give_up_at)) is not None:
        status = answer.json().get("status")
        if status == "Ready":
            with ledger.lock:
                ledger.ready_at[key] = time.time()
                ledger.ready_seen[key] = ledger.ready_seen.get(key, 0) + 1
            return
        if status == "Task not found":
            with ledger.lock:
                ledger.not_found.append(job_id)
            return
        if status != "Pending":
            with ledger.lock:
                ledger.errors.append(f"job {job_id}: {answer.text[:200]}")
            return
        time.sleep(0.1)


def check_store(data_dir: Path, ledger: Ledger) -> dict:
    """The SQLite store and the files, read after the server stopped."""
    db = sqlite3.connect(data_dir / "jobs.sqlite3")
    try:
        rows = {r[0]: r[1:] for r in db.execute("SELECT id, state, attempts, results, idempotency_key FROM jobs")}
    finally:
        db.close()
    per_key: dict[str, list[str]] = {}
    for job_id, (_, _, _, key) in rows.items():
        per_key.setdefault(key, []).append(job_id)
    lost, not_ready, bad_files = [], [], []
    for key, job_id in ledger.accepted.items():
        if job_id not in rows:
            lost.append(job_id)
            continue
        state, _, results, _ = rows[job_id]
        if state != "ready":
            not_ready.append((job_id, state))
            continue
        files = [r["file"] for r in json.loads(results)]
        folder = data_dir / "results" / job_id
        on_disk = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        if len(files) != 1 or on_disk != files:
            bad_files.append((job_id, files, on_disk))
    duplicated = [k for k, ids in per_key.items() if len(ids) > 1]
    duplicated += [k for k, ids in ledger.ids_per_key.items() if len(ids) > 1 and k not in duplicated]
    orphans = [k for k in per_key if k not in ledger.accepted]  # made, never answered to a client
    interrupted = [job_id for job_id, (_, attempts, _, _) in rows.items() if attempts > 1]
    return {"rows": len(rows), "lost": lost, "not_ready": not_ready, "bad_files": bad_files,
            "duplicated": duplicated, "orphans": orphans, "interrupted": interrupted}


def check_pixels(data_dir: Path, job_ids: list[str], args) -> tuple[int, int]:
    """The images of these jobs against the plain pipeline (the job's own prompt and seed)."""
    import numpy as np
    import torch
    from PIL import Image

    from fluxion.pipeline import Pipeline

    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained("tiny-schnell")
    db = sqlite3.connect(data_dir / "jobs.sqlite3")
    same = 0
    try:
        for job_id in job_ids:
            spec = json.loads(db.execute("SELECT spec FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
            reference = pipe(spec["prompt"], seed=spec["seeds"][0], height=spec["height"], width=spec["width"],
                             num_inference_steps=spec["steps"])[0]
            with Image.open(data_dir / "results" / job_id / "0.png") as image:
                same += np.array_equal(np.asarray(image.convert("RGB")), np.asarray(reference))
    finally:
        db.close()
    return same, len(job_ids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long clients submit new jobs")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--kill-at", type=float, default=0.5, help="when to kill -9 the server, as a fraction")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    parser.add_argument("--drain-seconds", type=float, default=180.0, help="how long accepted jobs may take to end")
    parser.add_argument("--pixel-sample", type=int, default=16, help="jobs checked against the pipeline, besides "
                                                                      "the interrupted ones")
    parser.add_argument("--no-pixel-check", action="store_true", help="check durability only")
    parser.add_argument("--data-dir", type=Path, help="default: a temporary folder, removed after")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fluxion-load-") as tmp:
        data_dir = args.data_dir or Path(tmp)
        data_dir.mkdir(parents=True, exist_ok=True)
        server = Server(args, data_dir, free_port())
        ledger = Ledger()
        try:
            server.start()
            figures = run(args, server, ledger)
        finally:
            server.stop()
        store = check_store(data_dir, ledger)
        done = set(ledger.accepted.values()) - set(store["lost"]) - {job_id for job_id, _ in store["not_ready"]}
        interrupted = sorted(done & set(store["interrupted"]))
        others = sorted(done - set(interrupted))
        sample = random.Random(0).sample(others, min(args.pixel_sample, len(others)))
        checked_ids = [] if args.no_pixel_check else interrupted + sample
        same, checked = check_pixels(data_dir, checked_ids, args) if checked_ids else (0, 0)
    return report(args, ledger, figures, store, same, checked)


def run(args, server: Server, ledger: Ledger) -> dict:
    start = time.time()
    submit_until = start + 60 * args.minutes
    give_up_at = submit_until + args.drain_seconds
    threads = [threading.Thread(target=client, args=(k, server.url, args, ledger, submit_until, give_up_at),
                                daemon=True) for k in range(args.clients)]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, start + args.kill_at * 60 * args.minutes - time.time()))
    with ledger.lock:
        accepted_before = len(ledger.accepted)
    killed_at = server.kill()
    ready_again_at = server.start()
    for thread in threads:
        thread.join()
    end = time.time()
    # after the kill and the restart, every key still names its own job: the same request again answers the same
    # id and makes nothing new (check_store counts the rows after this)
    mismatched = 0
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for key, job_id in list(ledger.accepted.items()):
            answer = http.post("/v1/tiny-schnell", json=ledger.bodies[key], headers={"Idempotency-Key": key})
            mismatched += answer.status_code != 200 or answer.json()["id"] != job_id
    successes = sorted(ledger.successes)
    outage = [b - a for a, b in zip(successes, successes[1:]) if b >= killed_at - 1]
    return {"seconds": end - start, "killed_at": killed_at - start, "accepted_before_kill": accepted_before,
            "restart_seconds": ready_again_at - killed_at, "client_gap_seconds": max(outage, default=0.0),
            "keys_not_bound": mismatched}


def report(args, ledger: Ledger, figures: dict, store: dict, same: int, checked: int) -> int:
    latencies = [ledger.ready_at[k] - ledger.accepted_at[k] for k in ledger.ready_at]
    completed = len(ledger.ready_at)
    twice = [k for k, n in ledger.ready_seen.items() if n != 1]
    never = [k for k in ledger.accepted if k not in ledger.ready_at]
    result = {
        "clients": args.clients, "minutes": args.minutes, "steps": args.steps, "size": args.size,
        "jobs_accepted": len(ledger.accepted), "jobs_completed": completed,
        "lost": len(store["lost"]) + len(ledger.not_found), "not_ready": len(store["not_ready"]),
        "accepted_never_seen_ready": len(never),
        "duplicated": len(store["duplicated"]), "orphans": len(store["orphans"]), "bad_files": len(store["bad_files"]),
        "ready_seen_not_once": len(twice), "keys_not_bound_after_restart": figures["keys_not_bound"],
        "rerun_after_kill": len(store["interrupted"]), "pixels_equal": f"{same}/{checked}",
        "images_per_s": round(completed / figures["seconds"], 2),
        "p50_s": round(percentile(latencies, 0.5), 3), "p95_s": round(percentile(latencies, 0.95), 3),
        "max_s": round(max(latencies, default=float("nan")), 3),
        "killed_at_s": round(figures["killed_at"], 1), "accepted_before_kill": figures["accepted_before_kill"],
        "restart_to_ready_s": round(figures["restart_seconds"], 2),
        "longest_gap_without_answers_s": round(figures["client_gap_seconds"], 2),
        "transport_retries": ledger.transport_retries, "refused_429_503": ledger.refused,
        "unanswered_submissions": ledger.unanswered, "errors": ledger.errors[:5],
        "run_seconds": round(figures["seconds"], 1), "cores": os.cpu_count(),
    }
    for name, value in result.items():
        print(f"{name:>32}: {value}")
    failures = [name for name in ("lost", "not_ready", "accepted_never_seen_ready", "duplicated", "orphans",
                                  "bad_files", "ready_seen_not_once", "keys_not_bound_after_restart") if result[name]]
    failures += ["errors"] if ledger.errors else []
    failures += ["no job was accepted"] if not ledger.accepted else []
    print("durability (nothing lost, each job once):", "PASS" if not failures else f"FAIL ({', '.join(failures)})")
    if checked:
        print("bit-exact (images = the lone pipeline's):", "PASS" if same == checked else f"FAIL ({same}/{checked})")
        failures += ["pixels"] if same != checked else []
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
