"""
POST / throughput of chatweb (durable: every 204 waits for its SQLite
commit) against a minimal in-memory Klein app, measured in the same run.

    python bench/post_throughput.py [--total 4000] [--connections 32]

Prints requests per second for both and their ratio.  The client runs in
this process; both servers run as child processes on 127.0.0.1, one at a
time, so they get the same machine.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import load  # noqa: E402
from chatweb.testing import twistdCommand  # noqa: E402


def start(command: list[str], pattern: bytes, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert process.stdout is not None
    deadline = time.time() + 60
    while time.time() < deadline:
        line = process.stdout.readline()
        match = re.search(pattern, line)
        if match:
            # Keep reading its output (chatweb logs each message): a full
            # pipe would stop the server.
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return process, int(match.group(1))
        if not line and process.poll() is not None:
            break
    process.kill()
    raise RuntimeError(f"{command[0]} did not start")


def measure(command: list[str], pattern: bytes, total: int, connections: int, env=None) -> float:
    process, port = start(command, pattern, env)
    try:
        load.run(port, min(total, 400), connections, 20)  # warm up
        seconds, codes = load.run(port, total, connections, 20)
    finally:
        process.terminate()
        process.wait(30)
    bad = [c for c in codes if c != 204]
    if bad:
        raise RuntimeError(f"{len(bad)} answers were not 204: {sorted(set(bad))}")
    return len(codes) / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--total", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()

    baseline = measure(
        [sys.executable, os.path.join(HERE, "baseline_app.py"), "0"],
        rb"baseline listening on 127\.0\.0\.1:(\d+)",
        args.total,
        args.connections,
    )
    with tempfile.TemporaryDirectory() as dataDir:
        chatweb = measure(
            twistdCommand()
            + ["-n", "--pidfile=", "chatweb", "--data-dir", dataDir,
               "--listen", "tcp:0:interface=127.0.0.1"],
            rb"chatweb listening on 127\.0\.0\.1:(\d+)",
            args.total,
            args.connections,
            env=dict(os.environ, CHATWEB_API_KEY="bench"),
        )
    print(f"baseline (in-memory Klein, key, validation): {baseline:8.0f} requests/s")
    print(f"chatweb  (auth, validation, SQLite commit)  : {chatweb:8.0f} requests/s")
    print(f"ratio chatweb / baseline: {chatweb / baseline:.2f}")


if __name__ == "__main__":
    main()
