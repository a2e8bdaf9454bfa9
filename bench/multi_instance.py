"""
Several chatweb instances on one PostgreSQL, against one on SQLite, in the
same run: POST / throughput (every 204 waits for its commit) and delivery
latency (from a message's receipt to its delivery.done, the echo responder
answering), with 1, 2 and 3 instances.

    python bench/multi_instance.py [--total 2000] [--connections 16] [--sessions 20]

The PostgreSQL server is a throwaway cluster (tests/postgres.py: initdb in a
temporary directory, fsync off, as in the tests); every instance and the
load generator share this machine's cores with it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import load  # noqa: E402
from post_throughput import start  # noqa: E402
from chatweb.testing import twistdCommand  # noqa: E402
from tests.postgres import cluster  # noqa: E402

PATTERN = rb"chatweb listening on 127\.0\.0\.1:(\d+)"


def post(ports: list[int], total: int, connections: int, sessions: int) -> tuple[float, list[int]]:
    perConnection = total // connections
    codes: list[int] = []
    plans = [
        [load.postRequest(f"s{(c + n) % sessions}", f"c{c}-{n}", "bench")
         for n in range(perConnection)]
        for c in range(connections)
    ]

    async def main() -> None:
        await asyncio.gather(*(
            load._connection("127.0.0.1", ports[c % len(ports)], plan, codes)
            for c, plan in enumerate(plans)
        ))

    started = time.perf_counter()
    asyncio.run(main())
    return time.perf_counter() - started, codes


def sqliteQuery(path: str) -> Callable[[], tuple[int, list[float]]]:
    def query() -> tuple[int, list[float]]:
        with sqlite3.connect(path) as db:
            pending = db.execute("SELECT count(*) FROM queue WHERE state = 'pending'").fetchone()[0]
            rows = db.execute(
                "SELECT e.time - q.received FROM events e JOIN queue q"
                " ON q.id = json_extract(e.data, '$.message') WHERE e.kind = 'delivery.done'"
            ).fetchall()
        return pending, [r[0] for r in rows]

    return query


def postgresQuery(dsn: str) -> Callable[[], tuple[int, list[float]]]:
    import psycopg

    def query() -> tuple[int, list[float]]:
        with psycopg.connect(dsn) as db:
            pending = db.execute("SELECT count(*) FROM queue WHERE state = 'pending'").fetchone()[0]
            rows = db.execute(
                "SELECT e.time - q.received FROM events e JOIN queue q"
                " ON q.id = (e.data::json->>'message')::bigint WHERE e.kind = 'delivery.done'"
            ).fetchall()
        return pending, [r[0] for r in rows]

    return query


def run(label: str, instances: int, more: list[str], query: Any, tmp: str, args: Any) -> None:
    """
    Start C{instances} instances (with C{more} options), post, wait until
    all is delivered; print the figures.  C{query} reads (pending, latencies).
    """
    env = dict(os.environ, CHATWEB_API_KEY="bench", PYTHONPATH=ROOT)
    processes = []
    try:
        ports = []
        for n in range(instances):
            process, port = start(
                twistdCommand() + [
                    "-n", "--pidfile=", "chatweb", "--data-dir", os.path.join(tmp, str(n)),
                    "--listen", "tcp:0:interface=127.0.0.1", "--responder", "echo",
                    "--rate-limit", "0", "--max-pending", "1000000",
                    "--max-pending-per-session", "1000000", "--interval", "1", *more,
                ],
                PATTERN, env,
            )
            processes.append(process)
            ports.append(port)
            # Its log goes on: read it, or the full pipe would stop it.
            threading.Thread(target=process.stdout.read, daemon=True).start()
        started = time.perf_counter()
        seconds, codes = post(ports, args.total, args.connections, args.sessions)
        bad = [c for c in codes if c != 204]
        if bad:
            raise RuntimeError(f"{len(bad)} answers were not 204: {sorted(set(bad))}")
        deadline = time.time() + 300
        while True:
            pending, done = query()
            if pending == 0 and len(done) >= len(codes):
                break
            if time.time() > deadline:
                raise RuntimeError(f"{label}: still {pending} pending")
            time.sleep(0.2)
        drained = time.perf_counter() - started
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
    done.sort()
    p95 = done[int(len(done) * 0.95) - 1]
    print(f"{label:<26} POST {len(codes) / seconds:6.0f}/s  delivered {len(done) / drained:6.0f}/s"
          f"  latency p50 {statistics.median(done) * 1000:6.0f} ms  p95 {p95 * 1000:6.0f} ms",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--total", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--sessions", type=int, default=20)
    args = parser.parse_args()
    print(f"{args.total} messages over {args.connections} connections into"
          f" {args.sessions} sessions, echo responder, {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run("1 instance, SQLite", 1, [],
            sqliteQuery(os.path.join(tmp, "0", "chatweb.sqlite3")), tmp, args)
    server = cluster()
    for n in (1, 2, 3):
        name = server.createDatabase()
        dsn = server.dsn(name)
        with tempfile.TemporaryDirectory() as tmp:
            run(f"{n} instance{'s' if n > 1 else ''}, PostgreSQL", n, ["--database", dsn],
                postgresQuery(dsn), tmp, args)
        server.dropDatabase(name)


if __name__ == "__main__":
    main()
