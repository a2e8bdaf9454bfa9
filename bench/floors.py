"""
Issue 13, item 1: how far a durable POST / can get against bare twisted.web
on this machine, whatever chatweb does.  In one run, alternating, each
server on CPU 0 and wrk (16 keep-alive connections) on CPU 1:

  - bare: bench/baseline_bare.py, the target's baseline (no disk);
  - bench/floor.py, SQLite group commit and nothing else, with its
    hand-written parser and behind twisted.web (PARSER=twisted.web), each
    writing one row per message (MODE=store) or what chatweb writes for a
    message delivered to an idle session (MODE=deliver);
  - the real `twistd -n chatweb` (SQLite).

    python bench/floors.py [--seconds 8] [--runs 2]

Prints req/s, the server's CPU per request (all threads, from /proc) and
each against bare's of the same round.  bench/NOTES.md reads the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from table import BASELINE_KEY, ENV, PY, Server, baseline, twistdChatweb, wrk  # noqa: E402

FLOORS = (
    ("floor, hand-written parser, one row", "hand-written", "store"),
    ("floor, hand-written parser, chatweb's rows", "hand-written", "deliver"),
    ("floor, twisted.web, one row", "twisted.web", "store"),
    ("floor, twisted.web, chatweb's rows", "twisted.web", "deliver"),
)


def floor(parser: str, mode: str) -> Server:
    ENV.update(PARSER=parser, MODE=mode)
    try:
        return Server([PY, os.path.join(HERE, "floor.py"), "0"],
                      rb"floor listening on 127\.0\.0\.1:(\d+)")
    finally:
        del ENV["PARSER"], ENV["MODE"]


def measure(server: Server, seconds: float) -> tuple[float, float]:
    """
    Requests per second and CPU seconds per request at 16 connections.
    """
    try:
        wrk(server.port, "/", 16, 2, BASELINE_KEY, "POST")  # warm up
        before = server.cpuSeconds()
        result = wrk(server.port, "/", 16, seconds, BASELINE_KEY, "POST")
        answered = result["rps"] * seconds
        return result["rps"], (server.cpuSeconds() - before) / answered
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    for run in range(1, args.runs + 1):
        bare, bareCPU = measure(baseline("bare"), args.seconds)
        print(f"\nround {run}: POST / at 16 connections{'':22} req/s   us CPU/req"
              f"   x bare (req/s)")
        print(f"  {'bare twisted.web (memory)':55} {bare:7,.0f} {bareCPU * 1e6:8.0f}")
        servers = [(name, lambda p=p, m=m: floor(p, m)) for name, p, m in FLOORS]
        with tempfile.TemporaryDirectory() as dataDir:
            servers.append(("twistd -n chatweb (SQLite)", lambda: twistdChatweb(dataDir)))
            for name, start in servers:
                rps, cpu = measure(start(), args.seconds)
                print(f"  {name:55} {rps:7,.0f} {cpu * 1e6:8.0f}   {rps / bare:.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
