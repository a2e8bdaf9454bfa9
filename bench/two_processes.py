"""
Issue 13, item 4: POST / throughput of two chatweb processes against one,
on the same store (PostgreSQL with leases: several instances need it), on
this machine's cores, in one run; and where the CPU goes.

    python bench/two_processes.py [--seconds 10] [--runs 2] [--streams]

The load is two wrk processes (8 keep-alive connections each, bodies spread
over 64 sessions by bench/wrk.lua): with one instance both send to it, with
two each sends to one (two ports; the same as one port shared with
SO_REUSEPORT, without the kernel's uneven spread).  Nothing is pinned:
instances, PostgreSQL (a throwaway cluster, fsync off, as in the tests) and
wrk share the cores, as they would on a two-core host.  For each run, the
CPU time of each part (from /proc) per request shows what limits it.

With --streams, two clients follow C{GET /events} while the load runs, like
the two wrk processes (both on the one instance, or one on each): each of
two instances then reads back the events the other commits (with no stream
open, it need not).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from post_throughput import start  # noqa: E402
from chatweb.testing import twistdCommand  # noqa: E402
from tests.postgres import Cluster, cluster  # noqa: E402

PATTERN = rb"chatweb listening on 127\.0\.0\.1:(\d+)"
KEY = "bench-key-0123456789abcdef"
TICK = os.sysconf("SC_CLK_TCK")


def cpuSeconds(pid: int, thread: int | None = None) -> float:
    """
    The CPU time (user and system) of a process, or of one of its threads.
    """
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def postgresProcesses(server: Cluster) -> dict[int, float]:
    """
    The CPU time of the cluster's postmaster and each of its children.
    """
    with open(os.path.join(server.data, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    found = {postmaster: cpuSeconds(postmaster)}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            if parent == postmaster:
                found[int(name)] = cpuSeconds(int(name))
    return found


class Activity:
    """
    What the database's sessions are doing, sampled every 20 ms from
    pg_stat_activity while the load runs: running a statement, waiting for
    an advisory lock (a session's, or the event log's at a write's commit)
    or for a row's lock, or idle inside a transaction (waiting for chatweb
    to send the next statement); and the transactions committed (chatweb's
    writes and reads).
    """

    def __init__(self, dsn: str, database: str) -> None:
        import psycopg

        self._connection = psycopg.connect(dsn, autocommit=True)
        self._database = database
        self.counts: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self.commits = self._commits()
        self._thread.start()

    def _commits(self) -> int:
        row = self._connection.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (self._database,)
        ).fetchone()
        return int(row[0]) if row else 0

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            rows = self._connection.execute(
                "SELECT state, wait_event_type, wait_event FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()", (self._database,)
            ).fetchall()
            self.samples += 1
            for state, waitType, waitEvent in rows:
                if waitType == "Lock" and waitEvent == "advisory":
                    self.counts["waiting for an advisory lock"] += 1
                elif waitType == "Lock":
                    self.counts["waiting for a row's lock"] += 1
                elif state == "active":
                    self.counts["running a statement"] += 1
                elif state == "idle in transaction":
                    self.counts["in a transaction, waiting for chatweb"] += 1

    def stop(self) -> tuple[dict[str, float], int]:
        """
        The mean number of sessions in each state, and the transactions
        committed meanwhile.
        """
        self._stop.set()
        self._thread.join()
        # Less this sampler's own queries (autocommitted: one per sample).
        commits = self._commits() - self.commits - self.samples - 1
        self._connection.close()
        # pg_stat_database is updated when a session reports its stats.
        return {k: v / max(self.samples, 1) for k, v in self.counts.items()}, commits


class Follower:
    """
    Follows C{GET /events} on a port in a thread, reading and dropping what
    comes, and counts the events.
    """

    def __init__(self, port: int) -> None:
        import socket

        self._socket = socket.create_connection(("127.0.0.1", port))
        self._socket.sendall(
            f"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\n\r\n".encode()
        )
        self.events = 0
        self._thread = threading.Thread(target=self._read)
        self._thread.start()

    def _read(self) -> None:
        tail = b""
        while True:
            try:
                data = self._socket.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            data = tail + data
            self.events += data.count(b"\nid: ")
            tail = data[-4:]  # (a marker cut in two is counted once)

    def stop(self) -> int:
        import socket

        self._socket.shutdown(socket.SHUT_RDWR)
        self._thread.join()
        self._socket.close()
        return self.events


def wrk(port: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        ["wrk", "-t1", "-c8", f"-d{seconds:g}s", "-s", os.path.join(HERE, "wrk.lua"),
         f"http://127.0.0.1:{port}/"],
        stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, BENCH_KEY=KEY, BENCH_METHOD="POST"),
    )


def results(process: subprocess.Popen) -> tuple[int, int, int, float]:
    out, _ = process.communicate()
    match = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if not match:
        raise RuntimeError(f"wrk said: {out}")
    requests, duration, bad, errors, p50, p99, worst = map(int, match.groups())
    return requests, bad, errors, duration / 1e6


def run(server: Cluster, instances: int, seconds: float, streams: bool = False) -> dict[str, float]:
    name = server.createDatabase()
    env = dict(os.environ, CHATWEB_API_KEY=KEY, PYTHONPATH=ROOT)
    processes = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ports = []
            for n in range(instances):
                process, port = start(twistdCommand() + [
                    "-n", "--pidfile=", "chatweb", "--data-dir", os.path.join(tmp, str(n)),
                    "--listen", "tcp:0:interface=127.0.0.1:backlog=1024",
                    "--database", server.dsn(name), "--rate-limit", "0",
                    "--max-pending", "1000000", "--max-pending-per-session", "1000000",
                ], PATTERN, env)
                processes.append(process)
                ports.append(port)
            followers = [Follower(ports[n % instances]) for n in range(2)] if streams else []
            for load in [wrk(ports[n % instances], 1) for n in range(2)]:
                results(load)  # warm up: connections, caches, the JIT-less rest
            pids = [p.pid for p in processes]
            before = {
                "chatweb": sum(cpuSeconds(pid) for pid in pids),
                "reactor": max(cpuSeconds(pid, pid) for pid in pids),
            }
            postgres = postgresProcesses(server)
            children = os.times()
            activity = Activity(server.dsn(), name)
            loads = [wrk(ports[n % instances], seconds) for n in range(2)]
            done = [results(load) for load in loads]
            states, commits = activity.stop()
            children = os.times().__class__(
                [a - b for a, b in zip(os.times(), children)]
            )
            afterPostgres = postgresProcesses(server)
            chatwebCPU = sum(cpuSeconds(pid) for pid in pids) - before["chatweb"]
            reactorCPU = max(cpuSeconds(pid, pid) for pid in pids) - before["reactor"]
            followed = [follower.stop() for follower in followers]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
        server.dropDatabase(name)
    requests = sum(d[0] for d in done)
    elapsed = max(d[3] for d in done)
    bad = sum(d[1] for d in done)
    errors = sum(d[2] for d in done)
    if bad:
        raise RuntimeError(f"{bad} answers were not 2xx")
    postgresCPU = sum(cpu - postgres.get(pid, 0.0) for pid, cpu in afterPostgres.items())
    wrkCPU = children.children_user + children.children_system
    return {
        "rps": requests / elapsed,
        "errors": errors,
        "elapsed": elapsed,
        "chatweb": chatwebCPU / requests * 1000,
        "postgres": postgresCPU / requests * 1000,
        "wrk": wrkCPU / requests * 1000,
        "busiest reactor": reactorCPU / elapsed,
        "cores used": (chatwebCPU + postgresCPU + wrkCPU) / elapsed,
        "states": states,  # type: ignore[dict-item]
        "commits per request": commits / requests,
        "followed": followed,  # type: ignore[dict-item]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--streams", action="store_true",
                        help="two clients follow GET /events meanwhile")
    args = parser.parse_args()
    server = cluster()
    print(f"POST / for {args.seconds:g} s, 2 wrk x 8 connections, {os.cpu_count()} cores,"
          " PostgreSQL (fsync off)" + (", 2 clients following GET /events" if args.streams else "")
          + "; CPU ms per request", flush=True)
    print(f"{'run':<14} {'req/s':>7} {'vs 1':>6} {'chatweb':>8} {'postgres':>9} {'wrk':>6}"
          f" {'cores used':>11} {'busiest reactor':>16}")
    for n in range(args.runs):
        one = None
        for instances in (1, 2):
            r = run(server, instances, args.seconds, args.streams)
            one = one or r["rps"]
            label = f"{instances} process{'es' if instances > 1 else ''} #{n + 1}"
            print(f"{label:<14} {r['rps']:7.0f} {r['rps'] / one:5.2f}x {r['chatweb']:8.2f}"
                  f" {r['postgres']:9.2f} {r['wrk']:6.2f} {r['cores used']:11.2f}"
                  f" {r['busiest reactor'] * 100:15.0f}%"
                  + (f"  ({r['errors']:.0f} socket errors)" if r["errors"] else ""),
                  flush=True)
            states = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["states"].items()))  # type: ignore[attr-defined]
            print(f"    database sessions on average: {states};"
                  f" {r['commits per request']:.2f} transactions per request (writes and reads)"
                  + (f"; events followed: {', '.join(map(str, r['followed']))}"  # type: ignore[call-overload]
                     if r["followed"] else ""), flush=True)


if __name__ == "__main__":
    main()
