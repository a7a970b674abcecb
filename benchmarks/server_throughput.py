"""Server throughput on tiny-schnell: images per second and latency (p50, p95) at 1, 4 and 16 concurrent clients,
with batching (--max-batch 16) and without (--max-batch 1), against sequential generation (the pipeline called
once per image in a loop, no HTTP). Target (issue #26): batching at 16 clients gives at least 2x the images per
second of sequential generation.

Each server is a real `fluxion serve` subprocess on a free local port; each client is a thread in a closed loop
(send a request to POST /v1/images/generations, wait for its image, send the next), all requests different (prompt
and seed). A run warms up, then counts the requests that end within the next --seconds: images per second is
their number over --seconds, p50/p95 their latencies (request sent to image received).

    python benchmarks/server_throughput.py --threads 1 --seconds 20 --json server_throughput.json

`--breakdown` times the parts of one image instead (no HTTP), to show the ceiling batching can reach: the
transformer's steps per image alone and in a batch of 16, the VAE decode and the rest (PNG, tensors to images),
which cost the same per image batched or not.
"""

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle", "a purple square",
           "an orange triangle above a red square", "three yellow circles", "a blue circle right of a green square"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def sequential(args) -> dict:
    """The baseline: one image per pipeline call, in a loop, in a fresh process with the same thread count."""
    code = f"""
import json, time, torch
from fluxion import Pipeline
pipe = Pipeline.from_pretrained("tiny-schnell")
prompts = {PROMPTS!r}
for i in range(3):
    pipe(prompts[i % len(prompts)], seed=i, height={args.size}, width={args.size}, num_inference_steps={args.steps})
latencies, start, i = [], time.perf_counter(), 0
while time.perf_counter() - start < {args.seconds}:
    t = time.perf_counter()
    pipe(prompts[i % len(prompts)], seed=1000 + i, height={args.size}, width={args.size},
         num_inference_steps={args.steps})
    latencies.append(time.perf_counter() - t)
    i += 1
print(json.dumps({{"images": i, "seconds": time.perf_counter() - start, "latencies": latencies}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return summary("sequential (pipeline loop)", 1, data["images"], data["seconds"], data["latencies"])


BREAKDOWN = """
import json, time, torch
from fluxion import Pipeline
from torch.utils.flop_counter import FlopCounterMode
from fluxion.invariance import batch_invariant
pipe = Pipeline.from_pretrained("tiny-schnell")
prompts, kw = {prompts!r}, dict(height={size}, width={size}, num_inference_steps={steps})
def ms_per_image(call, images, repeats):
    call(); call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats / images * 1000
image = ms_per_image(lambda: pipe(prompts[0], seed=1, **kw), 1, 40)
steps_alone = ms_per_image(lambda: pipe(prompts[0], seed=1, output_type="latent", **kw), 1, 40)
with batch_invariant():
    steps_batched = ms_per_image(lambda: pipe(prompts[:1] * 16, seed=1, output_type="latent", **kw), 16, 5)
latents = pipe(prompts[0], seed=1, output_type="latent", **kw)
decode = ms_per_image(lambda: pipe.decode(latents), 1, 40)
with FlopCounterMode(display=False) as counter:
    pipe(prompts[:1] * 16, seed=1, output_type="latent", **kw)
steps_gflop = counter.get_total_flops() / 16 / 1e9
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
peak = 2 * 1024 ** 3 / ms_per_image(lambda: a @ b, 1, 20) / 1e6
print(json.dumps(dict(image=image, steps_alone=steps_alone, steps_batched=steps_batched, decode=decode,
                      steps_gflop=steps_gflop, gemm_gflops=peak)))
"""


def breakdown(args) -> None:
    """Per-image milliseconds of each part, and the most batching could give if everything else cost nothing."""
    code = BREAKDOWN.format(prompts=PROMPTS, size=args.size, steps=args.steps)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    ms = json.loads(out.stdout.strip().splitlines()[-1])
    rest = ms["image"] - ms["steps_alone"] - ms["decode"]
    floor = ms["steps_batched"] + ms["decode"] + rest
    print(f"one image alone:              {ms['image']:6.1f} ms")
    print(f"  transformer steps (+text):  {ms['steps_alone']:6.1f} ms alone, {ms['steps_batched']:.1f} ms per image "
          f"in a batch of 16 (batch-invariant)")
    print(f"  VAE decode:                 {ms['decode']:6.1f} ms")
    print(f"  the rest (PNG, conversion): {rest:6.1f} ms")
    print(f"batched floor per image:      {floor:6.1f} ms -> at most {ms['image'] / floor:.2f}x the pipeline loop "
          f"without HTTP or queueing")
    at_peak = ms["steps_gflop"] / ms["gemm_gflops"] * 1000
    print(f"  the steps are {ms['steps_gflop']:.2f} GFLOP per image: {at_peak:.1f} ms at this core's fp32 GEMM peak "
          f"({ms['gemm_gflops']:.0f} GFLOP/s), so even then at most "
          f"{ms['image'] / (at_peak + ms['decode'] + rest):.2f}x")
    print(f"machine: {cpu_name()}, {args.threads} torch thread(s), load average {os.getloadavg()}")


def summary(name: str, clients: int, images: int, seconds: float, latencies: list[float]) -> dict:
    return {"setup": name, "clients": clients, "images": images, "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 2), "p50_ms": round(1000 * percentile(latencies, 0.5), 1),
            "p95_ms": round(1000 * percentile(latencies, 0.95), 1)}


class Server:
    def __init__(self, args, max_batch: int, data_dir: Path, workers: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fluxion.cli", "serve", "--model", "tiny-schnell", "--port", str(self.port),
             "--data-dir", str(data_dir), "--max-batch", str(max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
             "--queue-size", "1024", "--result-ttl", "600", "--workers", str(workers)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def load(args, server: Server, name: str, clients: int) -> dict:
    """`clients` threads in closed loops for --seconds (after a warm-up of a few requests each)."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    stop_at = [float("inf")]
    start_at = [0.0]

    def client(index: int) -> None:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            while True:
                i = next(counter)
                t = time.perf_counter()
                if t >= stop_at[0]:
                    return
                answer = http.post("/v1/images/generations", json={
                    "prompt": PROMPTS[i % len(PROMPTS)], "model": "tiny-schnell", "size": f"{args.size}x{args.size}",
                    "steps": args.steps, "seed": 10_000 + i})
                answer.raise_for_status()
                end = time.perf_counter()
                if start_at[0] and start_at[0] <= end <= stop_at[0]:  # ended in the measured window
                    with lock:
                        latencies.append(end - t)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(args.warmup)  # warm-up: every client in its loop, the first batches run
    start_at[0] = time.perf_counter()
    stop_at[0] = start_at[0] + args.seconds
    for thread in threads:
        thread.join()
    return summary(name, clients, len(latencies), args.seconds, latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per run")
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server and the baseline")
    parser.add_argument("--batch-wait-ms", type=float, default=50.0)
    parser.add_argument("--workers", type=int, default=2, help="also run the batching server with this many workers")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--breakdown", action="store_true", help="time the parts of one image instead")
    args = parser.parse_args()
    if args.breakdown:
        return breakdown(args)

    load_before = os.getloadavg()
    rows = [sequential(args)]
    print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        setups = [(1, 1), (16, 1)] + ([(16, args.workers)] if args.workers > 1 else [])
        for max_batch, workers in setups:
            name = f"server --max-batch {max_batch}" + (f" --workers {workers}" if workers > 1 else "")
            server = Server(args, max_batch, Path(tmp) / f"batch-{max_batch}-{workers}", workers)
            try:
                for clients in args.clients:
                    rows.append(load(args, server, name, clients))
                    print(rows[-1], flush=True)
            finally:
                server.stop()
    baseline = rows[0]["images_per_s"]
    for row in rows:
        row["vs_sequential"] = round(row["images_per_s"] / baseline, 2)
    header = f"{'setup':<28} {'clients':>7} {'images/s':>9} {'x seq':>6} {'p50 ms':>8} {'p95 ms':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['setup']:<28} {r['clients']:>7} {r['images_per_s']:>9.2f} {r['vs_sequential']:>6.2f} "
              f"{r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f}")
    for r in rows:
        if "--max-batch 16" in r["setup"] and r["clients"] == 16:
            verdict = "met" if r["vs_sequential"] >= 2 else "NOT met"
            print(f"target (>= 2x sequential at 16 clients), {r['setup']}: {verdict} ({r['vs_sequential']}x)")
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
               "load_average_before": load_before, "load_average_after": os.getloadavg()}
    print(f"machine: {machine}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "machine": machine, "settings": vars(args)}, indent=2,
                                        default=str) + "\n")


if __name__ == "__main__":
    main()
