"""benchmarks/server_load.py, short: concurrent clients through a kill -9 and a restart. What it adds to
test_server_restart.py: clients retrying with Idempotency-Key across the crash, and every key still answering its
own job after the restart (nothing lost, nothing made twice). Images are checked there and in the batching tests."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "server_load.py"


def test_load_with_a_kill_9_loses_and_repeats_nothing(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--minutes", "0.2", "--clients", "4", "--steps", "2",
                          "--no-pixel-check", "--data-dir", str(tmp_path), "--drain-seconds", "120"],
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = dict(line.strip().split(": ", 1) for line in run.stdout.splitlines() if ": " in line)
    assert int(figures["jobs_accepted"]) > 0 and figures["jobs_accepted"] == figures["jobs_completed"]
    assert int(figures["transport_retries"]) > 0, "the clients should have met the outage"
    assert "durability (nothing lost, each job once): PASS" in run.stdout
