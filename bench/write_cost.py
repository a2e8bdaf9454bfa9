"""
What the store's write of one durable POST costs, and what fewer index
entries would save (bench/NOTES.md): chatweb's own one-write append
(C{_queuedAndRecorded} with the local backend's record: the queue row, the
session's message row, four events) in groups of 8 messages to 64 sessions,
each group one transaction committed to disk (WAL, synchronous=FULL), on
one thread: no HTTP, no reactor.  Each variant drops or narrows indexes on
a fresh database; the figure is CPU time per message (user + system) and
its ratio to chatweb's schema as it is, measured in the same run,
alternating.

    taskset -c 0 python bench/write_cost.py [--messages 12000] [--rounds 2]

Variants:
  - full session index: every message in the session index, as before
    schema version 2 (queue_open_by_session holds only those not yet
    delivered);
and what a change to chatweb would buy:
  - partial state index: queue_by_state only for messages not delivered;
  - partial state-time: and no events_by_time;
  - batched: chatweb's schema, the same rows and JSON written one
    C{executemany} per table for each group (ids given, not read back),
    and none of chatweb's model objects (the events' JSON formatted by
    hand): the least these rows cost from Python.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from chatweb.backends import local  # noqa: E402
from chatweb.store import _journal  # noqa: E402
from chatweb.store._sqlite import _configure, _upgrade, applySchema  # noqa: E402

GROUP = 8
SESSIONS = 64
OPEN = "WHERE state <> 'delivered'"
VARIANTS: dict[str, list[str]] = {
    "chatweb": [],
    "full session index": [
        # As before schema version 2: every message indexed by session.
        "DROP INDEX queue_open_by_session",
        "CREATE INDEX queue_by_session ON queue (session, id)",
    ],
    "partial state index": [
        "DROP INDEX queue_by_state",
        f"CREATE INDEX queue_by_state ON queue (state, id) {OPEN}",
    ],
    "partial state-time": [
        "DROP INDEX queue_by_state",
        f"CREATE INDEX queue_by_state ON queue (state, id) {OPEN}",
        "DROP INDEX events_by_time",
    ],
    "batched": [],
}


def batched(cursor: sqlite3.Cursor, group: list[tuple[str, str, float]]) -> None:
    """
    The rows of C{_queuedAndRecorded} for each of C{group}, one
    C{executemany} per table.
    """
    cursor.execute("SELECT seq FROM sqlite_sequence WHERE name = 'queue'")
    row = cursor.fetchone()
    first = (row[0] if row else 0) + 1
    queue, messages, events, sessions = [], [], [], []
    for n, (session, content, received) in enumerate(group):
        messageId = first + n
        queue.append((messageId, session, content, received, "delivered"))
        sessions.append((session, received))
        message = local._dumps({"role": "user", "content": content, "created": received})
        messages.append((session, messageId, message))
        events.append(("message.queued", session, received, f'{{"message": {messageId}}}'))
        events.append(("delivery.started", session, received,
                       f'{{"message": {messageId}, "attempt": 1, "received": {received!r}}}'))
        events.append(("message.added", session, received,
                       f'{{"delivery": {messageId}, "message": {message}}}'))
        events.append(("delivery.done", session, received,
                       f'{{"message": {messageId}, "attempt": 1}}'))
    cursor.executemany(
        "INSERT INTO queue (id, session, content, received, state) VALUES (?, ?, ?, ?, ?)",
        queue)
    cursor.executemany("INSERT OR IGNORE INTO sessions (id, created) VALUES (?, ?)", sessions)
    cursor.executemany(
        "INSERT OR IGNORE INTO messages (session, delivery, data) VALUES (?, ?, ?)", messages)
    cursor.executemany(
        "INSERT INTO events (kind, session, time, data) VALUES (?, ?, ?, ?)", events)


def record(cursor: sqlite3.Cursor, delivery: object, now: float) -> list:
    # What the local backend's recorder gives the journal: its events, to
    # record with the journal's.
    return local._deliveryRecorded(cursor, delivery, now)[1]  # type: ignore[arg-type]


def cost(variant: str, messages: int) -> float:
    """
    CPU seconds per message of C{variant}, after a warm-up of 4,000.
    """
    directory = tempfile.mkdtemp()
    try:
        connection = sqlite3.connect(os.path.join(directory, "store.sqlite3"),
                                     isolation_level=None)
        _configure(connection)
        cursor = connection.cursor()
        applySchema(cursor, _journal.SCHEMA, _upgrade)
        applySchema(cursor, local.SCHEMA, _upgrade)
        for statement in VARIANTS[variant]:
            cursor.execute(statement)
        n = 0

        def write(count: int) -> None:
            nonlocal n
            for _ in range(count // GROUP):
                cursor.execute("BEGIN IMMEDIATE")
                if variant == "batched":
                    group = []
                    for _ in range(GROUP):
                        n += 1
                        group.append((f"w{n % SESSIONS}", f"message {n} from wrk", time.time()))
                    batched(cursor, group)
                    cursor.execute("COMMIT")
                    continue
                for _ in range(GROUP):
                    n += 1
                    _journal._queuedAndRecorded(
                        cursor, f"w{n % SESSIONS}", f"message {n} from wrk",
                        time.time(), None, record)
                cursor.execute("COMMIT")

        write(4000)
        before = os.times()
        write(messages)
        after = os.times()
        connection.close()
        return ((after.user - before.user) + (after.system - before.system)) / messages
    finally:
        shutil.rmtree(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=12000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    figures: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            figures[name].append(cost(name, args.messages))
    base = min(figures["chatweb"])
    print(f"{'schema':22} {'CPU us/message (best)':>22} {'x chatweb':>10}")
    for name, values in figures.items():
        best = min(values)
        print(f"{name:22} {best * 1e6:22.1f} {best / base:10.2f}")


if __name__ == "__main__":
    main()
