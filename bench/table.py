"""
One table of chatweb's performance, every figure a ratio against a baseline
measured in the same run (`make bench-table`, or `python bench/table.py`).

Servers run pinned to one core (taskset -c 0) and the load (wrk, and this
script) to the other (-c 1), one server at a time.  The baselines:

  - bench/baseline_bare.py: a bare twisted.web Resource, and
  - bench/baseline_app.py: a minimal Klein app,

both checking X-API-Key and validating the body with chatweb's own parser
into a dict in memory.  chatweb's POST figures come from the real
`twistd -n chatweb` (SQLite: each 204 waits for its commit); the others from
bench/chatweb_server.py (the same ChatWebService, with timestamps of the
queue and the adapter, and a 1 ms timer that notes reactor stalls).

Needs wrk (Debian: apt-get install wrk) and taskset (util-linux).  See
bench/README.md for how to read the table.

    python bench/table.py [--seconds 2] [--no-rss] [--only post,get,page,delivery,stall,rss]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from chatweb.config import DATABASE_NAME  # noqa: E402
from chatweb.testing import twistdCommand  # noqa: E402

SERVER_CPU, LOAD_CPU = "0", "1"
BASELINE_KEY = "bench"
CHATWEB_KEY = "bench-key-0123456789abcdef"  # bench/chatweb_server.py's
PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

rows: list[tuple[str, str, str, str, str, str]] = []


def row(figure: str, value: str, baseline: str, ratio: str, target: str = "",
        ok: bool | None = None) -> None:
    verdict = "" if ok is None else ("PASS" if ok else "FAIL")
    rows.append((figure, value, baseline, ratio, target, verdict))
    print(f"  {figure}: {value} | {baseline} | {ratio} {target} {verdict}", file=sys.stderr,
          flush=True)


def pinned(cpu: str, command: list[str]) -> list[str]:
    return (["taskset", "-c", cpu] if shutil.which("taskset") else []) + command


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """
    A server in a child process, pinned to the server core, until stopped.
    """

    def __init__(self, command: list[str], ready: bytes) -> None:
        self.process = subprocess.Popen(pinned(SERVER_CPU, command), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, env=ENV)
        assert self.process.stdout is not None
        deadline = time.time() + 60
        self.port = 0
        while time.time() < deadline:
            line = self.process.stdout.readline()
            match = re.search(ready, line)
            if match:
                self.port = int(match.group(1)) if match.groups() else 0
                break
            if not line and self.process.poll() is not None:
                raise RuntimeError(f"{command} did not start")
        else:
            self.process.kill()
            raise RuntimeError(f"{command} did not start in time")
        # Keep reading its output, so that it never blocks on a full pipe.
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def cpuSeconds(self) -> float:
        """
        The server's CPU time so far (all its threads, user and system;
        taskset execs the server, so its pid is the server's).
        """
        try:
            with open(f"/proc/{self.process.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def baseline(kind: str, sessions: int = 0) -> Server:
    script = {"bare": "baseline_bare.py", "klein": "baseline_app.py"}[kind]
    return Server([PY, os.path.join(HERE, script), "0", str(sessions)],
                  rb"listening on 127\.0\.0\.1:(\d+)")


def twistdChatweb(dataDir: str) -> Server:
    return Server(twistdCommand() + [
        "-n", "--pidfile=", "chatweb", "--data-dir", dataDir, "--api-key", BASELINE_KEY,
        "--listen", "tcp:0:interface=127.0.0.1:backlog=1024"],
        rb"chatweb listening on 127\.0\.0\.1:(\d+)")


class Probed(Server):
    """
    bench/chatweb_server.py: its records are read once it has stopped.
    """

    def __init__(self, dataDir: str, responder: str = "none") -> None:
        self.stats = os.path.join(dataDir, "stats.json")
        port = freePort()
        super().__init__([PY, os.path.join(HERE, "chatweb_server.py"), dataDir, str(port),
                          self.stats, responder], rb"^ready")
        self.port = port

    def records(self) -> dict[str, Any]:
        self.stop()
        with open(self.stats) as f:
            return json.load(f)


def wrk(port: int, path: str, connections: int, seconds: float, key: str,
        method: str = "GET", close: bool = False) -> dict[str, float]:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s",
               os.path.join(HERE, "wrk.lua"), f"http://127.0.0.1:{port}{path}"]
    if close:
        command += ["-H", "Connection: close"]
    out = subprocess.run(pinned(LOAD_CPU, command), capture_output=True, text=True,
                         env=dict(os.environ, BENCH_KEY=key, BENCH_METHOD=method),
                         check=True).stdout
    match = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if not match:
        raise RuntimeError(f"wrk said: {out}")
    requests, duration, bad, errors, p50, p99, worst = map(int, match.groups())
    if bad:
        raise RuntimeError(f"{path}: {bad} answers not 2xx, {errors} socket errors")
    if errors:
        # Timeouts (wrk waits 2 s) or refused connections on a loaded
        # machine: counted, not fatal.
        print(f"  {path}, {connections} conn: {errors} socket errors", file=sys.stderr)
    return {"rps": requests / (duration / 1e6), "p50": p50 / 1000, "p99": p99 / 1000,
            "errors": errors}


# POST / ---------------------------------------------------------------------

CONNECTIONS = (1, 16, 64)
MODES = (("keep-alive", False), ("new connection", True))


def postRuns(server: Server, key: str, seconds: float) -> dict[tuple[str, int], dict]:
    results = {}
    try:
        wrk(server.port, "/", 16, 1, key, "POST")  # warm up
        for mode, close in MODES:
            for c in CONNECTIONS:
                before = server.cpuSeconds()
                result = wrk(server.port, "/", c, seconds, key, "POST", close)
                # CPU per answered request: what the server spends, whatever
                # else the machine runs (req/s vary with the other jobs).
                answered = result["rps"] * seconds
                result["cpu"] = (server.cpuSeconds() - before) / answered if answered else 0.0
                results[(mode, c)] = result
    finally:
        server.stop()
    return results


def times(value: float, baseline: float, name: str) -> str:
    # A run with no answers at all (the machine stalled) has no ratio.
    return f"{value / baseline:.2f} x {name}" if baseline else f"- x {name}"


def post(seconds: float) -> None:
    bare = postRuns(baseline("bare"), BASELINE_KEY, seconds)
    klein = postRuns(baseline("klein"), BASELINE_KEY, seconds)
    with tempfile.TemporaryDirectory() as dataDir:
        chatweb = postRuns(twistdChatweb(dataDir), BASELINE_KEY, seconds)
    for mode, _ in MODES:
        for c in CONNECTIONS:
            cw, b, k = chatweb[(mode, c)], bare[(mode, c)], klein[(mode, c)]
            name = f"POST / {mode}, {c} conn"
            target: dict[str, Any] = {}
            if mode == "keep-alive" and c == 16:
                target = dict(target=">= 0.80 x bare", ok=cw["rps"] >= 0.8 * b["rps"] > 0)
            if cw["errors"] or b["errors"] or k["errors"]:
                name += f" ({cw['errors']}/{b['errors']}/{k['errors']} socket errors)"
            row(f"{name}: req/s", f"{cw['rps']:,.0f}", f"bare {b['rps']:,.0f}",
                times(cw["rps"], b["rps"], "bare"), **target)
            row(f"{name}: req/s", f"{cw['rps']:,.0f}", f"klein {k['rps']:,.0f}",
                times(cw["rps"], k["rps"], "klein"))
            if c == 16:
                row(f"{name}: server CPU us/request", f"{cw['cpu'] * 1e6:,.0f}",
                    f"bare {b['cpu'] * 1e6:,.0f}", times(cw["cpu"], b["cpu"], "bare"))
            for p in ("p50", "p99"):
                row(f"{name}: {p} ms", f"{cw[p]:.2f}", f"bare {b[p]:.2f}",
                    f"{cw[p] / max(b[p], 0.001):.2f} x bare")


# Data for the reads ---------------------------------------------------------

def prepare(dataDir: str, sessions: int, long: bool) -> None:
    """
    A data dir with C{sessions} sessions (ids s00000...) and, when C{long},
    sessions "m50" and "m5000" of realistic messages (each message different).
    """
    Probed(dataDir).stop()  # creates the schema
    from render import sampleMessages, unique
    with sqlite3.connect(os.path.join(dataDir, DATABASE_NAME)) as db:
        db.executemany("INSERT INTO sessions (id, created) VALUES (?, 1700000000)",
                       ((f"s{n:05}",) for n in range(sessions)))
        if long:
            sample = sampleMessages()
            # "warm" is viewed first: templates compiled, lexers loaded.
            for name, count, offset in (("warm", 20, 9000), ("m50", 50, 0),
                                        ("m5000", 5000, 100)):
                db.execute("INSERT INTO sessions (id, created) VALUES (?, 1700000000)", (name,))
                db.executemany("INSERT INTO messages (session, data) VALUES (?, ?)", (
                    (name, json.dumps(unique(sample[n % len(sample)], offset + n).asDict(),
                                      ensure_ascii=False, separators=(",", ":")))
                    for n in range(count)))
    os.remove(os.path.join(dataDir, "stats.json"))


def get(port: int, path: str, key: str = CHATWEB_KEY,
        connection: http.client.HTTPConnection | None = None) -> float:
    c = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    start = time.perf_counter()
    c.request("GET", path, headers={"X-API-Key": key})
    r = c.getresponse()
    r.read()
    took = time.perf_counter() - start
    if connection is None:
        c.close()
    if r.status != 200:
        raise RuntimeError(f"GET {path}: {r.status}")
    return took


def listing(small: str, large: str, seconds: float) -> None:
    figures = {}
    for count, dataDir in ((10, small), (10_000, large)):
        for kind in ("bare", "klein"):
            server = baseline(kind, count)
            try:
                figures[(kind, count)] = wrk(server.port, "/sessions", 1, seconds, BASELINE_KEY)
            finally:
                server.stop()
        server = Probed(dataDir)
        try:
            figures[("chatweb", count)] = wrk(server.port, "/sessions", 1, seconds, CHATWEB_KEY)
        finally:
            server.stop()
    for count in (10, 10_000):
        cw, b, k = (figures[(n, count)]["p50"] for n in ("chatweb", "bare", "klein"))
        row(f"GET /sessions, {count:,} sessions: p50 ms (1 conn)", f"{cw:.2f}", f"bare {b:.2f}",
            f"{cw / b:.2f} x bare")
        row(f"GET /sessions, {count:,} sessions: p50 ms (1 conn)", f"{cw:.2f}", f"klein {k:.2f}",
            f"{cw / k:.2f} x klein")
    few, many = figures[("chatweb", 10)]["p50"], figures[("chatweb", 10_000)]["p50"]
    row("GET /sessions, 10,000 against 10 sessions", f"{many:.2f} ms", f"10: {few:.2f} ms",
        f"{many / few:.1f} x", "<= 5 x", many / few <= 5)


def pages(large: str) -> None:
    server = Probed(large)
    try:
        get(server.port, "/session?id=warm")
        first50 = get(server.port, "/session?id=m50")
        first5000 = get(server.port, "/session?id=m5000")
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        again50 = statistics.median(get(server.port, "/session?id=m50", connection=connection)
                                    for _ in range(20))
        again5000 = statistics.median(get(server.port, "/session?id=m5000",
                                          connection=connection) for _ in range(5))
        connection.close()
    finally:
        server.stop()
    row("GET /session, 5,000 messages, first view", f"{first5000 * 1000:.0f} ms",
        f"50 msgs {first50 * 1000:.1f} ms", f"{first5000 / first50:.1f} x",
        "< 1 s and <= 110 x", first5000 < 1 and first5000 / first50 <= 110)
    row("GET /session, 5,000 messages, repeat view", f"{again5000 * 1000:.1f} ms",
        f"50 msgs {again50 * 1000:.1f} ms", f"{again5000 / again50:.1f} x",
        "<= 110 x", again5000 / again50 <= 110)
    row("GET /session, 50 messages, repeat view", f"{again50 * 1000:.1f} ms",
        f"first {first50 * 1000:.1f} ms", f"{again50 / first50:.2f} x first")


# Delivery and hand-over -----------------------------------------------------

def postOne(connection: http.client.HTTPConnection, session: str, content: str) -> None:
    connection.request("POST", "/", body=json.dumps({"session": session, "content": content}),
                       headers={"X-API-Key": CHATWEB_KEY, "Content-Type": "application/json"})
    r = connection.getresponse()
    r.read()
    if r.status != 204:
        raise RuntimeError(f"POST /: {r.status}")


def delivery(small: str, answering: str) -> None:
    server = Probed(small)
    try:
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        postOne(c, "idle", "warm-up")
        time.sleep(0.1)
        roundTrips = []
        for n in range(150):
            start = time.perf_counter()
            postOne(c, "idle", f"idle {n}")
            roundTrips.append(time.perf_counter() - start)
            time.sleep(0.015)
        c.close()
    finally:
        records = server.records()
    # Hand-over needs messages that wait: a session that answers each one
    # (the echo responder) is busy while it does, and the client posts
    # faster than that.
    server = Probed(answering, "echo")
    try:
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        for n in range(200):
            postOne(c, "busy", f"busy {n}")
        time.sleep(1.5)
        c.close()
    finally:
        answered = server.records()
    for kind in ("stored", "deliver", "delivered"):
        records[kind] += answered[kind]

    def by(kind: str, session: str) -> dict[str, float]:
        return {content: t for s, content, t in records[kind] if s == session}

    stored, delivered = by("stored", "idle"), by("deliver", "idle")
    gaps = [delivered[c] - stored[c] for c in stored if c in delivered and c != "warm-up"]
    # An idle session's message is recorded by the backend in the
    # transaction that stores it, before the 204 is written: that latency
    # is 0.
    first = sum(1 for gap in gaps if gap <= 0)
    idle = sorted(max(0.0, gap) for gap in gaps)
    p50, p99 = quantile(idle, 0.5) * 1000, quantile(idle, 0.99) * 1000
    rtt = statistics.median(roundTrips) * 1000
    row(f"delivery to an idle session, p50 ms ({len(idle)})", f"{p50:.2f}",
        f"POST rtt {rtt:.2f}", f"{p50 / rtt:.2f} x rtt", "< 2 ms", p50 < 2)
    row(f"delivery to an idle session, p99 ms ({len(idle)})", f"{p99:.2f}",
        f"POST rtt {rtt:.2f}", f"{p99 / rtt:.2f} x rtt", "< 10 ms", p99 < 10)
    row("  ... delivered before the 204 was written", f"{first} of {len(gaps)}", "", "")
    stored, starts, ends = by("stored", "busy"), by("deliver", "busy"), by("delivered", "busy")
    handovers = sorted(
        starts[f"busy {n + 1}"] - ends[f"busy {n}"] for n in range(199)
        if f"busy {n}" in ends and f"busy {n + 1}" in starts
        and stored[f"busy {n + 1}"] < ends[f"busy {n}"]  # it was waiting
    )
    if not handovers:
        row("hand-over, p50 ms", "no waiting message", "", "", "< 5 ms", False)
        return
    h50 = quantile(handovers, 0.5) * 1000
    row(f"hand-over (idle to next deliver), p50 ms ({len(handovers)})", f"{h50:.2f}",
        f"POST rtt {rtt:.2f}", f"{h50 / rtt:.2f} x rtt", "< 5 ms", h50 < 5)
    row(f"hand-over, p99 ms ({len(handovers)})", f"{quantile(handovers, 0.99) * 1000:.2f}",
        "", "")


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# The longest stall of the reactor ------------------------------------------

def stall(large: str, seconds: float) -> None:
    server = Probed(large)
    windows = {}
    try:
        start = time.monotonic()
        time.sleep(seconds)
        windows["idle"] = (start, time.monotonic())
        stop = threading.Event()

        listed: list[float] = []

        def view(paths: list[str]) -> None:
            n = 0
            while not stop.is_set():
                took = get(server.port, paths[n % len(paths)])
                if paths[n % len(paths)] == "/sessions":
                    listed.append(took)
                n += 1

        readers = [
            threading.Thread(target=view, args=([f"/session?id=m5000&before={5000 - 100 * k}"
                                                 for k in range(1, 50)],)),
            threading.Thread(target=view, args=(["/sessions", "/session?id=m50"],)),
        ]
        start = time.monotonic()
        for t in readers:
            t.start()
        wrk(server.port, "/", 16, seconds, CHATWEB_KEY, "POST")
        stop.set()
        for t in readers:
            t.join()
        windows["mixed"] = (start, time.monotonic())
    finally:
        records = server.records()

    def longest(window: tuple[float, float], column: int) -> float:
        gaps = [s[column] for s in records["stalls"] if window[0] <= s[0] <= window[1]]
        return max(gaps, default=0.001) * 1000

    quiet, mixed = longest(windows["idle"], 1), longest(windows["mixed"], 1)
    row("longest reactor stall, mixed load, ms", f"{mixed:.1f}", f"idle {quiet:.1f}",
        f"{mixed / quiet:.1f} x idle", "<= 10 ms", mixed <= 10)
    quiet, mixed = longest(windows["idle"], 2), longest(windows["mixed"], 2)
    row("  most CPU of the reactor's thread in one gap, ms", f"{mixed:.1f}", f"idle {quiet:.1f}",
        f"{mixed / max(quiet, 0.01):.1f} x idle", "<= 10 ms", mixed <= 10)
    if listed:
        row("GET /sessions, 10,000 sessions, under the mixed load: p50 ms",
            f"{statistics.median(listed) * 1000:.2f}", "", "")


def rss() -> None:
    out = subprocess.run([PY, os.path.join(HERE, "queued_rss.py"), "--settle", "4",
                          "--limit", "1e9"], capture_output=True, text=True, env=ENV,
                         check=True).stdout
    idle = float(re.search(r"idle RSS: ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    full = float(re.search(r"queued: ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    row("RSS idle, MB", f"{idle:.1f}", "", "")
    row("RSS with 1,000,000 queued, MB", f"{full:.1f}", f"idle {idle:.1f}",
        f"{full / idle:.2f} x idle", "<= idle + 50 MB", full - idle <= 50)


def printTable() -> None:
    headers = ("figure", "chatweb", "baseline (same run)", "ratio", "target", "")
    widths = [max(len(r[i]) for r in rows + [headers]) for i in range(6)]
    for r in [headers, tuple("-" * w for w in widths)] + rows:
        print("  ".join(cell.ljust(w) if i in (0, 2, 4) else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(r, widths))).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per wrk run")
    parser.add_argument("--only", default="post,get,page,delivery,stall,rss")
    parser.add_argument("--no-rss", action="store_true", help="skip the 1,000,000 queue")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench/table.py needs wrk: apt-get install wrk (Debian/Ubuntu)")
    parts = args.only.split(",")
    if hasattr(os, "sched_setaffinity") and shutil.which("taskset"):
        # This script's own requests (the page and list clients of the
        # stall row, the timed GETs) are load too: on the load's core, not
        # the server's.  The servers are started pinned to theirs.
        os.sched_setaffinity(0, {int(LOAD_CPU)})
    if args.no_rss and "rss" in parts:
        parts.remove("rss")
    started = time.time()
    with tempfile.TemporaryDirectory() as small, tempfile.TemporaryDirectory() as large:
        if "post" in parts:
            post(args.seconds)
        if {"get", "page", "stall"} & set(parts):
            prepare(small, 10, False)
            prepare(large, 10_000, True)
        if "get" in parts:
            listing(small, large, args.seconds)
        if "page" in parts:
            pages(large)
        if "delivery" in parts:
            with tempfile.TemporaryDirectory() as fresh, \
                    tempfile.TemporaryDirectory() as answering:
                delivery(fresh, answering)
        if "stall" in parts:
            stall(large, args.seconds * 2)
        if "rss" in parts:
            rss()
    print(f"\nchatweb bench table ({time.time() - started:.0f} s; servers on CPU {SERVER_CPU},"
          f" load on CPU {LOAD_CPU}; ratios are against baselines of this run)")
    printTable()


if __name__ == "__main__":
    main()
