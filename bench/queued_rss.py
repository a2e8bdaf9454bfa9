"""
Memory with a long queue: the RSS of the real `twistd -n chatweb` when idle,
and when its database holds N pending messages for one session (inserted
with direct SQL into a stopped service's database: posting a million over
HTTP takes too long).  The goal of issue 10 is within 50 MB of idle.

    python bench/queued_rss.py [--messages 1000000] [--size 200]

Prints both RSS values (the highest of several samples taken once chatweb
is up and the queue has loaded) and their difference; exits non-zero when
the difference is above --limit MB.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet import task  # noqa: E402

from chatweb.service import DATABASE_NAME  # noqa: E402
from chatweb.testing import ChatWebProcess  # noqa: E402

KEY = "rss-bench-key-0123456789"


def rssMB(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def measure(reactor, dataDir: str, settle: float) -> float:  # type: ignore[no-untyped-def]
    process = ChatWebProcess(dataDir, KEY)
    await process.start(timeout=600)
    assert process.pid is not None
    peak = 0.0
    # Sample for `settle` seconds: the queue loads what is pending at start.
    for _ in range(int(settle * 2)):
        peak = max(peak, rssMB(process.pid))
        await task.deferLater(reactor, 0.5, lambda: None)
    await process.stop()
    return peak


def fill(dataDir: str, count: int, size: int) -> None:
    body = "x" * size
    with sqlite3.connect(os.path.join(dataDir, DATABASE_NAME)) as db:
        db.execute("PRAGMA synchronous=OFF")
        batch = 50_000
        for start in range(0, count, batch):
            n = min(batch, count - start)
            db.executemany(
                "INSERT INTO queue (session, content, received) VALUES ('busy', ?, ?)",
                ((body, 1_700_000_000.0 + start + i) for i in range(n)),
            )
        db.commit()


async def main(reactor) -> None:  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=200, help="bytes per message")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds sampled")
    parser.add_argument("--limit", type=float, default=50.0, help="MB over idle")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as idleDir, tempfile.TemporaryDirectory() as fullDir:
        idle = await measure(reactor, idleDir, args.settle)
        # Start and stop once so that chatweb creates its schema.
        await measure(reactor, fullDir, 1)
        fill(fullDir, args.messages, args.size)
        full = await measure(reactor, fullDir, args.settle)
    print(f"idle RSS: {idle:.1f} MB")
    print(f"RSS with {args.messages} messages queued: {full:.1f} MB")
    print(f"difference: {full - idle:.1f} MB (ratio {full / idle:.2f}); limit {args.limit} MB")
    if full - idle > args.limit:
        raise SystemExit(1)


if __name__ == "__main__":
    task.react(main)
