"""What the benchmark scripts share: one fresh worker process per measured row, and
peak memory. Not a benchmark itself (scripts import it from their own folder)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys


def run_worker(
    script: str, label: str, row: str, args: list[str], env: dict, timeout: float
) -> dict:
    """Run `script --impl row *args` in a fresh process and return the JSON of its last
    stdout line; a timeout or failure is a one-line SystemExit naming `label: row`."""
    command = [sys.executable, script, "--impl", row, *args]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{label}: {row} ran past --timeout {timeout} s") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit {done.returncode}"]
        raise SystemExit(f"{label}: {row} failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def maxrss_mb() -> float:
    """This process's peak resident memory so far, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
