"""
The real L{ChatWebService} (SQLite store, the local backend, responder
"none" unless RESPONDER is given) for bench/table.py, with what a black-box client cannot see:

  - the time each POST / is answered (its message is stored) and each
    adapter C{deliver} call and its end, per session (delivery and
    hand-over latency); a message delivered in the write that stores it
    counts as delivered when the backend records it there;
  - the reactor's stalls: a 1 ms timer notes every gap above 2 ms, and
    the CPU time the reactor's thread spent in it.

    python bench/chatweb_server.py DATA_DIR PORT STATS_FILE [RESPONDER]

Prints "ready" once it listens; on SIGTERM writes the records as JSON to
STATS_FILE (times from time.monotonic, which the client shares).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet import reactor, task  # noqa: E402

from chatweb._priority import favourTheReactor  # noqa: E402
from chatweb.backends.local import LocalBackend  # noqa: E402
from chatweb.queue._queue import MessageQueue  # noqa: E402
from chatweb.service import ChatWebService  # noqa: E402

KEY = "bench-key-0123456789abcdef"
records: dict[str, list] = {"stored": [], "deliver": [], "delivered": [], "stalls": []}


def instrument() -> None:
    post, deliver = MessageQueue.post, LocalBackend.deliver

    def timedPost(self, session, content, *args, **kwargs):  # type: ignore[no-untyped-def]
        d = post(self, session, content, *args, **kwargs)

        def stored(result):  # type: ignore[no-untyped-def]
            records["stored"].append((session, content, time.monotonic()))
            return result

        return d.addCallback(stored)

    record = LocalBackend._recordInTransaction

    def timedRecord(self, cursor, delivery, now):  # type: ignore[no-untyped-def]
        # Delivered in the write that stores it (a session with nothing
        # pending): on the writer thread, before the commit and the 204.
        events = record(self, cursor, delivery, now)
        at = time.monotonic()
        records["deliver"].append((delivery.session, delivery.content, at))
        records["delivered"].append((delivery.session, delivery.content, at))
        return events

    def timedDeliver(self, delivery):  # type: ignore[no-untyped-def]
        records["deliver"].append((delivery.session, delivery.content, time.monotonic()))
        d = deliver(self, delivery)

        def done(result):  # type: ignore[no-untyped-def]
            records["delivered"].append((delivery.session, delivery.content, time.monotonic()))
            return result

        return d.addBoth(done)

    MessageQueue.post = timedPost  # type: ignore[method-assign]
    LocalBackend.deliver = timedDeliver  # type: ignore[method-assign]
    LocalBackend._recordInTransaction = timedRecord  # type: ignore[method-assign]


def watchStalls() -> None:
    last = [time.monotonic()]
    lastCPU = [time.thread_time()]

    def tick() -> None:
        now, cpu = time.monotonic(), time.thread_time()
        gap = now - last[0]
        if gap > 0.002:
            # The wall-clock gap, and the CPU time the reactor's thread
            # used in it (its own work, not waiting for the GIL or a core).
            records["stalls"].append((now, gap, cpu - lastCPU[0]))
        last[0], lastCPU[0] = now, cpu

    task.LoopingCall(tick).start(0.001)
    if os.environ.get("BENCH_WATCHDOG"):
        watchdog(last)


def watchdog(last: list[float]) -> None:
    """
    Where the reactor's thread is while it is late (BENCH_WATCHDOG=1): the
    stacks seen more than 10 ms after the timer's last tick, counted.
    """
    import collections
    import threading
    import traceback

    main = threading.main_thread().ident
    seen: collections.Counter[str] = collections.Counter()
    records["late"] = seen  # type: ignore[assignment]

    def watch() -> None:
        while True:
            time.sleep(0.002)
            if time.monotonic() - last[0] > 0.010:
                frames = sys._current_frames()
                frame = frames.get(main)  # type: ignore[arg-type]
                for ident, other in frames.items():
                    if ident not in (main, threading.get_ident()):
                        top = traceback.extract_stack(other)[-3:]
                        seen["other: " + " < ".join(
                            f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}"
                            for f in reversed(top))] += 1
                if frame is not None:
                    stack = traceback.extract_stack(frame)[-14:]
                    seen[" < ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}"
                                    for f in reversed(stack))] += 1

    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    dataDir, port, statsFile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    responder = sys.argv[4] if len(sys.argv) > 4 else "none"
    instrument()
    service = ChatWebService(
        [KEY],
        dataDir,
        endpoint=f"tcp:{port}:interface=127.0.0.1:backlog=1024",
        responder=responder,
        # As `twistd chatweb` does (--page-workers 2); BENCH_PAGE_WORKERS=0
        # compares reading and rendering on threads.
        pageWorkers=int(os.environ.get("BENCH_PAGE_WORKERS", "2")),
    )
    service.startService()
    # As `twistd chatweb` does once started (chatweb/tap.py, _FreezeAtStart).
    gc.collect()
    gc.freeze()
    favourTheReactor()

    def ready(_: object) -> None:
        watchStalls()
        print("ready", flush=True)

    assert service.listening is not None
    service.listening.addCallback(ready)

    def save() -> None:
        with open(statsFile, "w") as f:
            json.dump(records, f)

    reactor.addSystemEventTrigger("before", "shutdown", save)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
