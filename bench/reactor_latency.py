"""
Does a heavy page view hold the reactor?  The median latency of small
POST / requests, probed every 20 ms, against an idle baseline measured in
the same run, while:

  1. four clients keep viewing pages of a 50,000-message session, each view
     a page never rendered before (nothing cached);
  2. four clients view pages of a session of hostile messages (quadratic
     lexers and Markdown, each cut off by the per-message budget);
  3. two clients fetch the HTML index of 20,000 sessions (a share token
     each) and /session/raw of a 5,000-message session of 2 KB messages.

The server (ChatWebAPI over a MemoryAdapter, on 127.0.0.1) runs in a child
process, so the probes do not share its GIL.

    python bench/reactor_latency.py [--seconds 4]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

KEY = "reactor-latency-bench-key"


def serve() -> None:
    from twisted.internet import reactor
    from twisted.web.server import Site

    from chatweb.web._api import ChatWebAPI
    from chatweb.model import Message, Session
    from chatweb.queue import MessageQueue
    from chatweb.testing import MemoryAdapter, MemoryJournal
    from render import sampleMessages

    sample = sampleMessages()
    adapter = MemoryAdapter()

    def unique(n: int) -> Message:
        m = sample[n % len(sample)]
        return Message(role=m.role, content=(m.content or "") + f"\n\n(message {n})",
                       reasoning_content=m.reasoning_content, tool_calls=m.tool_calls,
                       tool_call_id=m.tool_call_id, created=m.created)

    adapter.sessions["long"] = Session(id="long", messages=tuple(unique(n) for n in range(50_000)))
    hostile = ["```autoit\n" + " " * 8000, "```typescript\n" + "a." * 4000, "[![" * 30000]
    adapter.sessions["hostile"] = Session(id="hostile", messages=tuple(
        Message(role="assistant", content=hostile[n % 3] + f" {n}\n```") for n in range(400)))
    adapter.sessions["raw"] = Session(id="raw", messages=tuple(
        Message(role="user", content=f"{n} " + "x" * 2048) for n in range(5000)))
    for n in range(20_000):
        adapter.sessions[f"s{n:05}"] = Session(id=f"s{n:05}")
    queue = MessageQueue(MemoryJournal(), adapter, reactor)
    queue.start()
    api = ChatWebAPI(queue, adapter, [KEY], shareSecret=b"b" * 32)
    site = Site(api.resource())
    site.displayTracebacks = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1", backlog=100)
    print(f"port {port.getHost().port}", flush=True)
    reactor.run()


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[float, int, int]:
    start = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request(method, path, body=body, headers={"X-API-Key": KEY, **(headers or {})})
    r = c.getresponse()
    data = r.read()
    c.close()
    return time.perf_counter() - start, r.status, len(data)


def probe(port: int, seconds: float) -> list[float]:
    """
    A small POST / every 20 ms for C{seconds}: the latencies.
    """
    latencies = []
    end = time.perf_counter() + seconds
    body = json.dumps({"session": "probe", "content": "ping"}).encode()
    while time.perf_counter() < end:
        took, status, _ = request(port, "POST", "/", body)
        assert status == 204, status
        latencies.append(took)
        time.sleep(max(0.0, 0.02 - took))
    return latencies


def load(port: int, paths: list[str], results: Any, stop: Any,
         headers: dict[str, str] | None) -> None:
    n = 0
    while not stop.is_set():
        took, status, size = request(port, "GET", paths[n % len(paths)], headers=headers)
        results.put((took, size))
        n += 1


def scenario(port: int, seconds: float, clients: list[tuple[list[str], dict[str, str] | None]]) -> tuple[list[float], list[tuple[float, int]]]:
    """
    The probes' latencies while C{clients} (each in a process of its own,
    so that none shares the probes' GIL) keep requesting their paths; and
    the time and size of each of their views.
    """
    results: Any = multiprocessing.Queue()
    stop = multiprocessing.Event()
    loaders = [multiprocessing.Process(target=load, args=(port, paths, results, stop, headers))
               for paths, headers in clients]
    for p in loaders:
        p.start()
    time.sleep(0.5)
    latencies = probe(port, seconds)
    stop.set()
    viewed = []
    while any(p.is_alive() for p in loaders) or not results.empty():
        try:
            viewed.append(results.get(timeout=0.1))
        except Exception:
            pass
    for p in loaders:
        p.join()
    return latencies, viewed


def report(name: str, latencies: list[float], idle: float, viewed: list[tuple[float, int]]) -> None:
    median = statistics.median(latencies)
    line = (f"{name:34} POST / median {median * 1000:6.1f} ms ({median / idle:5.1f}x idle),"
            f" max {max(latencies) * 1000:6.1f} ms")
    if viewed:
        line += (f"; {len(viewed)} views, median {statistics.median(t for t, _ in viewed) * 1000:.0f} ms,"
                 f" largest {max(s for _, s in viewed) / 1024:.0f} KiB")
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--serve", action="store_true")
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"],
                              stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[1])
        idleLatencies = probe(port, args.seconds)
        idle = statistics.median(idleLatencies)
        report("idle", idleLatencies, idle, [])
        pages = [f"/session?id=long&before={50_000 - 100 * k}" for k in range(1, 500)]
        latencies, viewed = scenario(port, args.seconds, [(pages[i::4], None) for i in range(4)])
        report("4 viewers, 50,000-message session", latencies, idle, viewed)
        hostile = [f"/session?id=hostile&before={400 - 100 * k}" for k in range(4)]
        hostile[0] = "/session?id=hostile"
        latencies, viewed = scenario(port, args.seconds, [([path], None) for path in hostile])
        report("4 viewers, hostile session", latencies, idle, viewed)
        latencies, viewed = scenario(port, args.seconds, [
            (["/sessions"], {"Accept": "text/html"}), (["/session/raw?id=raw"], None)])
        report("index of 20,000 + 5,000-message raw", latencies, idle, viewed)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
