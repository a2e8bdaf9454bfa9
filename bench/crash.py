"""
The SIGKILL proof at scale: concurrent clients post to many sessions, the
real `twistd -n chatweb` is killed with SIGKILL in the middle, restarted on
the same data directory, and every message that got a 204 must be in its
session exactly once, in each client's posting order.

    python bench/crash.py [--messages 2000] [--sessions 20] [--clients 16] [--rounds 5]

Each round kills at a different point (a different share of the messages
acknowledged).  Prints one line per round and exits non-zero on any loss,
duplicate or reordering.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from treq.client import HTTPClient  # noqa: E402
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, gatherResults  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402

from chatweb.service import DATABASE_NAME  # noqa: E402
from chatweb.testing import ChatWebProcess  # noqa: E402

KEY = "crash-bench-key"


def stored(dataDir: str) -> tuple[dict[str, list[str]], int]:
    with sqlite3.connect(os.path.join(dataDir, DATABASE_NAME)) as db:
        rows = db.execute("SELECT session, data FROM messages ORDER BY seq").fetchall()
        pending = db.execute("SELECT count(*) FROM queue WHERE state = 'pending'").fetchone()[0]
    sessions: dict[str, list[str]] = defaultdict(list)
    for session, data in rows:
        sessions[session].append(json.loads(data)["content"])
    return sessions, pending


async def round_(reactor, args, killAt: int) -> dict:  # type: ignore[no-untyped-def]
    dataDir = tempfile.mkdtemp(prefix="chatweb-crash-")
    process = ChatWebProcess(dataDir, KEY)
    await process.start()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = args.clients
    client = HTTPClient(Agent(reactor, pool=pool))
    perClient = args.messages // args.clients
    acknowledged: list[tuple[str, str]] = []
    sent: set[str] = set()
    killed: Deferred[None] = Deferred()

    async def poster(c: int) -> None:
        for seq in range(perClient):
            if killed.called:
                return
            session = f"s{(c * 7 + seq) % args.sessions}"
            content = f"c{c:02d}-{seq:05d}"
            sent.add(content)
            try:
                response = await client.post(
                    process.url + "/",
                    json={"session": session, "content": content},
                    headers={"X-API-Key": KEY},
                )
                await response.content()
            except Exception:
                return
            if response.code != 204:
                return
            acknowledged.append((session, content))
            if len(acknowledged) >= killAt and not killed.called:
                killed.callback(None)
                await process.crash()

    started = time.monotonic()
    await gatherResults([Deferred.fromCoroutine(poster(c)) for c in range(args.clients)])
    await pool.closeCachedConnections()
    posting = time.monotonic() - started

    again = ChatWebProcess(dataDir, KEY)
    await again.start()
    for _ in range(600):
        sessions, pending = stored(dataDir)
        if pending == 0:
            break
        await task.deferLater(reactor, 0.1, lambda: None)
    await again.stop()
    sessions, pending = stored(dataDir)

    everything = [c for contents in sessions.values() for c in contents]
    lost = [c for s, c in acknowledged if c not in set(sessions.get(s, []))]
    duplicates = len(everything) - len(set(everything))
    strangers = set(everything) - sent
    disorder = 0
    for contents in sessions.values():
        last: dict[str, str] = {}
        for c in contents:
            client_ = c.split("-")[0]
            if client_ in last and last[client_] > c:
                disorder += 1
            last[client_] = c
    return {
        "acknowledged": len(acknowledged),
        "sent": len(sent),
        "stored": len(everything),
        "lost": len(lost),
        "duplicates": duplicates,
        "strangers": len(strangers),
        "disorder": disorder,
        "pending": pending,
        "posting": posting,
    }


async def main(reactor) -> None:  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    failures = 0
    for n in range(args.rounds):
        share = (n + 1) / (args.rounds + 1)
        killAt = max(1, int(args.messages * share))
        r = await round_(reactor, args, killAt)
        bad = r["lost"] + r["duplicates"] + r["strangers"] + r["disorder"] + r["pending"]
        failures += bad > 0
        print(
            f"round {n + 1}: killed after {r['acknowledged']} acknowledged of"
            f" {r['sent']} sent; stored {r['stored']}; lost {r['lost']},"
            f" duplicates {r['duplicates']}, out of order {r['disorder']},"
            f" still pending {r['pending']}"
            f" ({r['acknowledged'] / r['posting']:.0f} acknowledged/s before the kill)",
            flush=True,
        )
    print("result:", "FAILED" if failures else "ok: no acknowledged message lost, none twice, order kept")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    task.react(main)
