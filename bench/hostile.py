"""
Hostile clients against the real `twistd -n chatweb`:

  1. a flood of oversize requests (each refused with 413): the server's
     resident memory before and after, and the ratio;
  2. 50 slow clients holding half-sent requests: the latency of a normal
     request while they hang on, against the same request with none.

    python bench/hostile.py [--flood 3000] [--slow 50]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from post_throughput import start  # noqa: E402

sys.path.insert(0, os.path.dirname(HERE))
from chatweb.testing import twistdCommand  # noqa: E402

KEY = "hostile-bench"


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def oversize(port: int) -> int:
    body = b"x" * (2 * 1024 * 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(
                b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: " + KEY.encode()
                + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
        except OSError:
            pass
        answer = s.recv(64)
    return int(answer.split()[1]) if answer.startswith(b"HTTP/1.1") else 0


def timedGet(port: int) -> float:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/sessions", headers={"X-API-Key": KEY}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flood", type=int, default=3000)
    parser.add_argument("--slow", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as dataDir:
        process, port = start(
            twistdCommand()
            + ["-n", "--pidfile=", "chatweb", "--data-dir", dataDir,
               "--listen", "tcp:0:interface=127.0.0.1"],
            rb"chatweb listening on 127\.0\.0\.1:(\d+)",
            env=dict(os.environ, CHATWEB_API_KEY=KEY),
        )
        try:
            for _ in range(20):
                timedGet(port)
            before = rss(process.pid)
            with ThreadPoolExecutor(16) as pool:
                codes = list(pool.map(lambda _: oversize(port), range(args.flood)))
            after = rss(process.pid)
            refused = codes.count(413)
            print(f"flood: {args.flood} oversize requests (2 MiB each), {refused} answered 413")
            print(f"flood: server RSS {before} KiB before, {after} KiB after"
                  f" (ratio {after / before:.2f})")

            quiet = [timedGet(port) for _ in range(30)]
            slow = []
            for _ in range(args.slow):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Len")
                slow.append(s)
            held = [timedGet(port) for _ in range(30)]
            for s in slow:
                s.close()
            print(f"slow clients: median GET /sessions {median(quiet) * 1000:.2f} ms alone,"
                  f" {median(held) * 1000:.2f} ms with {args.slow} half-sent requests held"
                  f" (ratio {median(held) / median(quiet):.2f}; worst {max(held) * 1000:.2f} ms)")
        finally:
            process.terminate()
            process.wait(30)


if __name__ == "__main__":
    main()
