"""
The queue's durable journal: every accepted message is a row here before its
204 is sent, and stays until it is delivered or has failed for good.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from typing import Any, Callable

import attrs

from twisted.internet.defer import Deferred
from zope.interface import implementer

from chatweb.store._sqlite import SQLiteDatabase, Upgrades, sessionWrite
from chatweb.errors import IdempotencyConflict, UnknownMessage, WrongState
from chatweb.interfaces import IJournal
from chatweb.model._values import (
    DELIVERED,
    Delivery,
    DISCARDED,
    FAILED,
    PENDING,
    Event,
    EventKind,
    QueuedMessage,
)

#: Where committed events go (an L{chatweb.events.EventHub}'s C{publish}).
EventSink = Callable[[Event], None]


def publishCommitted(sink: EventSink | None, result: tuple[Any, list[Event]]) -> Any:
    """
    Give C{sink} the events of a committed write (its C{(value, events)}
    result), in order; the write's value.
    """
    value, events = result
    if sink is not None:
        for event in events:
            sink(event)
    return value

#: The condition of the partial index queue_open_by_session: a query names
#: it, word for word, to use that index.
OPEN = f"state <> '{DELIVERED}'"

#: The schema's upgrade steps, in order (see L{Upgrades}); version 0 is the
#: schema of the first release, which had no versions.
UPGRADES = Upgrades(
    (
        # 1: the event log.
        (
            """
            CREATE TABLE IF NOT EXISTS events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                kind TEXT NOT NULL,
                session TEXT NOT NULL,
                time REAL NOT NULL,
                data TEXT NOT NULL DEFAULT '{}'
            )
            """,
            "CREATE INDEX IF NOT EXISTS events_by_session ON events (session, id)",
            "CREATE INDEX IF NOT EXISTS events_by_time ON events (time)",
        ),
        # 2: a session's messages by id only while not delivered
        # (queue_open_by_session, in SCHEMA): the rest are never looked up
        # by session.
        ("DROP INDEX IF EXISTS queue_by_session",),
    )
)

SCHEMA: list[str | Upgrades] = [
    """
    CREATE TABLE IF NOT EXISTS queue (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session TEXT NOT NULL,
        content TEXT NOT NULL,
        received REAL NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    )
    """,
    "CREATE INDEX IF NOT EXISTS queue_by_state ON queue (state, id)",
    # Only messages not yet delivered: the lookups by session are for those
    # (each names OPEN in its WHERE, as SQLite needs to use this index), and
    # most messages are delivered (bench/write_cost.py: 10 % of a message's
    # write).
    f"CREATE INDEX IF NOT EXISTS queue_open_by_session ON queue (session, id) WHERE {OPEN}",
    """
    CREATE TABLE IF NOT EXISTS idempotency (
        key TEXT PRIMARY KEY,
        session TEXT NOT NULL,
        message INTEGER NOT NULL,
        digest TEXT NOT NULL,
        created REAL NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS idempotency_by_age ON idempotency (created)",
    UPGRADES,
]

#: How long events are kept, by default.
EVENT_RETENTION = 24 * 60 * 60

#: How long an Idempotency-Key is remembered.
IDEMPOTENCY_WINDOW = 24 * 60 * 60

_COLUMNS = "id, session, content, received, state, attempts, last_error"


def _row(row: tuple) -> QueuedMessage:
    return QueuedMessage(*row)


def contentDigest(content: str) -> str:
    """
    What an idempotency key remembers of the content it was first sent with.
    """
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def _get(cursor: sqlite3.Cursor, messageId: int) -> QueuedMessage | None:
    cursor.execute(f"SELECT {_COLUMNS} FROM queue WHERE id = ?", (messageId,))
    row = cursor.fetchone()
    return _row(row) if row else None


def _insertEvent(
    cursor: sqlite3.Cursor,
    kind: EventKind,
    session: str,
    when: float,
    data: dict[str, Any],
) -> Event:
    """
    Record an event in the transaction of C{cursor}.
    """
    cursor.execute(
        "INSERT INTO events (kind, session, time, data) VALUES (?, ?, ?, ?)",
        (kind.value, session, when, json.dumps(data)),
    )
    eventId = cursor.lastrowid
    assert eventId is not None
    return Event(eventId, kind, session, when, data)


#: An event not recorded yet: its kind, session, time and data.
EventRow = tuple[EventKind, str, float, dict[str, Any]]


def _insertEvents(cursor: sqlite3.Cursor, rows: list[EventRow]) -> list[Event]:
    """
    Record C{rows} in the transaction of C{cursor}, in order, with one
    statement (on PostgreSQL, one round trip instead of one each).
    """
    if not rows:
        return []
    cursor.execute(
        "INSERT INTO events (kind, session, time, data) VALUES "
        + ", ".join(["(?, ?, ?, ?)"] * len(rows)),
        [v for kind, session, when, data in rows
         for v in (kind.value, session, when, json.dumps(data))],
    )
    # Their ids are given in the rows' order: PostgreSQL's cursor returns
    # them all; SQLite, one writer, numbers one statement's rows one after
    # the other, up to lastrowid.
    ids = getattr(cursor, "insertedIds", None)
    if ids is None:
        last = cursor.lastrowid
        assert last is not None
        ids = range(last - len(rows) + 1, last + 1)
    assert len(ids) == len(rows)
    return [Event(i, *row) for i, row in zip(sorted(ids), rows)]


#: For other tables' writers (the local backend) that record events in the
#: same transaction as their change.
insertEvent = _insertEvent
insertEvents = _insertEvents


def _logEvent(
    cursor: sqlite3.Cursor,
    kind: EventKind,
    session: str,
    when: float,
    data: dict[str, Any],
) -> tuple[Event, list[Event]]:
    event = _insertEvent(cursor, kind, session, when, data)
    return event, [event]


def _eventsSince(
    cursor: sqlite3.Cursor, afterId: int, session: str | None, limit: int
) -> list[Event]:
    if session is None:
        cursor.execute(
            "SELECT id, kind, session, time, data FROM events WHERE id > ?"
            " ORDER BY id LIMIT ?",
            (afterId, limit),
        )
    else:
        cursor.execute(
            "SELECT id, kind, session, time, data FROM events"
            " WHERE session = ? AND id > ? ORDER BY id LIMIT ?",
            (session, afterId, limit),
        )
    return [
        Event(i, EventKind(k), s, t, json.loads(d)) for i, k, s, t, d in cursor.fetchall()
    ]


#: The events that change where a message is (C{GET /queue/{id}}'s times).
_MESSAGE_EVENT_KINDS = (
    "message.queued",
    "delivery.started",
    "delivery.done",
    "delivery.failed",
    "message.discarded",
)


def _messageHistory(
    cursor: sqlite3.Cursor, messageId: int
) -> tuple[QueuedMessage | None, list[Event]]:
    message = _get(cursor, messageId)
    if message is None:
        return None, []
    cursor.execute(
        "SELECT id, kind, session, time, data FROM events WHERE session = ?"
        f" AND kind IN ({', '.join('?' * len(_MESSAGE_EVENT_KINDS))})"
        " AND json_extract(data, '$.message') = ? ORDER BY id",
        (message.session, *_MESSAGE_EVENT_KINDS, messageId),
    )
    return message, [
        Event(i, EventKind(k), s, t, json.loads(d)) for i, k, s, t, d in cursor.fetchall()
    ]


def _pruneEvents(
    cursor: sqlite3.Cursor, before: float, keysBefore: float
) -> tuple[int, list[Event]]:
    cursor.execute("DELETE FROM events WHERE time < ?", (before,))
    pruned = cursor.rowcount
    # Expired idempotency keys go here, not at each POST: instances that
    # share a store would otherwise wait for each other's deletion of the
    # same rows.
    cursor.execute("DELETE FROM idempotency WHERE created < ?", (keysBefore,))
    return pruned, []


def _storedIn(args: tuple[Any, ...]) -> list[str]:
    """
    For L{sessionWrite}: the session a message is stored in, and its
    idempotency key's name (another instance storing a message with the
    same key waits, and then finds it).
    """
    session, _, _, idempotencyKey = args[:4]
    if idempotencyKey is None:
        return [session]
    return [session, f"\x00idempotency key\x00{idempotencyKey}"]


@sessionWrite(_storedIn)
def _queued(
    cursor: sqlite3.Cursor,
    session: str,
    content: str,
    received: float,
    idempotencyKey: str | None,
    state: str = PENDING,
) -> tuple[QueuedMessage, list[Event]]:
    message = _append(cursor, session, content, received, idempotencyKey, state)
    if message.duplicate:
        return message, []
    return message, [_insertEvent(cursor, *_queuedEvent(message))]


def _queuedEvent(message: QueuedMessage) -> EventRow:
    return (EventKind.MESSAGE_QUEUED, message.session, message.received,
            {"message": message.id})


#: Records a delivered message in the journal's transaction (an adapter's,
#: see L{SQLiteJournal.appendRecorded}): C{(cursor, delivery, now)} to the
#: events to record with the journal's, in order.  Like every write
#: operation, it may run twice (see L{chatweb.store._sqlite.runOperations}):
#: it must change the database only.
Recorder = Callable[[Any, Delivery, float], "list[EventRow]"]

#: Asked in the write that would store and deliver a message (see
#: L{SQLiteJournal.appendRecorded}): C{(cursor, session)} to whether it may
#: be delivered there and then.  With several instances, what one
#: instance's queue knows of a session is not all there is.
Guard = Callable[[Any, str], bool]


@sessionWrite(_storedIn)
def _queuedAndRecorded(
    cursor: sqlite3.Cursor,
    session: str,
    content: str,
    received: float,
    idempotencyKey: str | None,
    record: Recorder,
    guard: Guard | None = None,
) -> tuple[QueuedMessage, list[Event]]:
    if guard is not None and not guard(cursor, session):
        # Stored to be delivered the usual way (its state says so).
        return _queued(cursor, session, content, received, idempotencyKey)
    message = _append(cursor, session, content, received, idempotencyKey, DELIVERED)
    if message.duplicate:
        return message, []
    rows: list[EventRow] = [
        _queuedEvent(message),
        (EventKind.DELIVERY_STARTED, session, received,
         {"message": message.id, "attempt": 1, "received": received}),
        *record(cursor, message.delivery(), received),
        (EventKind.DELIVERY_DONE, session, received, {"message": message.id, "attempt": 1}),
    ]
    return message, _insertEvents(cursor, rows)


def _append(
    cursor: sqlite3.Cursor,
    session: str,
    content: str,
    received: float,
    idempotencyKey: str | None,
    state: str = PENDING,
) -> QueuedMessage:
    if idempotencyKey is not None:
        # A refusal writes nothing (see runOperations): expired keys are
        # ignored here, and forgotten only after.
        cursor.execute(
            "SELECT session, message, digest FROM idempotency WHERE key = ? AND created >= ?",
            (idempotencyKey, received - IDEMPOTENCY_WINDOW),
        )
        seen = cursor.fetchone()
        if seen is not None:
            if seen[0] != session or seen[2] != contentDigest(content):
                raise IdempotencyConflict(idempotencyKey)
            earlier = _get(cursor, seen[1])
            if earlier is not None:
                return attrs.evolve(earlier, duplicate=True)
    cursor.execute(
        "INSERT INTO queue (session, content, received, state) VALUES (?, ?, ?, ?)",
        (session, content, received, state),
    )
    messageId = cursor.lastrowid
    assert messageId is not None
    if idempotencyKey is not None:
        cursor.execute(
            "INSERT OR REPLACE INTO idempotency (key, session, message, digest, created)"
            " VALUES (?, ?, ?, ?, ?)",
            (idempotencyKey, session, messageId, contentDigest(content), received),
        )
    return QueuedMessage(messageId, session, content, received, state)


def _pending(cursor: sqlite3.Cursor) -> list[QueuedMessage]:
    cursor.execute(
        f"SELECT {_COLUMNS} FROM queue WHERE state = ? ORDER BY id", (PENDING,)
    )
    return [_row(r) for r in cursor.fetchall()]


def _undelivered(cursor: sqlite3.Cursor, session: str) -> list[QueuedMessage]:
    cursor.execute(
        f"SELECT {_COLUMNS} FROM queue WHERE session = ? AND {OPEN} AND state IN (?, ?)"
        " ORDER BY id",
        (session, PENDING, FAILED),
    )
    return [_row(r) for r in cursor.fetchall()]


def _failedSessions(cursor: sqlite3.Cursor) -> list[str]:
    cursor.execute("SELECT DISTINCT session FROM queue WHERE state = ?", (FAILED,))
    return [row[0] for row in cursor.fetchall()]


def _markDelivered(
    cursor: sqlite3.Cursor, messageId: int, now: float
) -> tuple[None, list[Event]]:
    cursor.execute(
        "UPDATE queue SET state = ? WHERE id = ?", (DELIVERED, messageId)
    )
    message = _get(cursor, messageId)
    if message is None:
        return None, []
    return None, [
        _insertEvent(
            cursor,
            EventKind.DELIVERY_DONE,
            message.session,
            now,
            {"message": messageId, "attempt": message.attempts + 1},
        )
    ]


def failureEventData(message: QueuedMessage, final: bool) -> dict[str, Any]:
    """
    The data of the C{delivery.failed} event of C{message} (as recorded).
    """
    return {
        "message": message.id,
        "attempt": message.attempts,
        "error": message.lastError,
        "final": final,
    }


def _recordFailure(
    cursor: sqlite3.Cursor, messageId: int, error: str, final: bool, now: float
) -> tuple[QueuedMessage, list[Event]]:
    cursor.execute(
        "UPDATE queue SET attempts = attempts + 1, last_error = ?, state = ?"
        " WHERE id = ?",
        (error, FAILED if final else PENDING, messageId),
    )
    cursor.execute(f"SELECT {_COLUMNS} FROM queue WHERE id = ?", (messageId,))
    message = _row(cursor.fetchone())
    return message, [
        _insertEvent(
            cursor,
            EventKind.DELIVERY_FAILED,
            message.session,
            now,
            failureEventData(message, final),
        )
    ]


#: A second thought about a message: the states it may be in, and the one
#: it goes to.
Change = tuple[tuple[str, ...], str]
REQUEUE: Change = ((FAILED,), PENDING)
DISCARD: Change = ((PENDING, FAILED), DISCARDED)


def changed(message: QueuedMessage | None, messageId: int, change: Change) -> QueuedMessage:
    """
    C{message} after C{change} (a requeue starts its attempts again).

    @raise UnknownMessage: if there is no such message.
    @raise WrongState: if it is not in a state the change applies to.
    """
    allowed, state = change
    if message is None:
        raise UnknownMessage(messageId)
    if message.state not in allowed:
        raise WrongState(message.state)
    attempts = 0 if state == PENDING else message.attempts
    return attrs.evolve(
        message, state=state, attempts=attempts, previousState=message.state
    )


def changeEvent(message: QueuedMessage) -> tuple[EventKind, dict[str, Any]]:
    """
    The event a requeue or discard of C{message} records.
    """
    if message.state == DISCARDED:
        return EventKind.MESSAGE_DISCARDED, {"message": message.id}
    return EventKind.MESSAGE_QUEUED, {"message": message.id, "retry": True}


def _changeState(
    cursor: sqlite3.Cursor, messageId: int, change: Change, now: float
) -> tuple[QueuedMessage, list[Event]]:
    while True:
        current = _get(cursor, messageId)
        message = changed(current, messageId, change)
        assert current is not None
        # Only what was read is changed: on PostgreSQL another instance may
        # have changed the message since (a delivery that ended); then it
        # is read again, as committed.
        cursor.execute(
            "UPDATE queue SET state = ?, attempts = ?"
            " WHERE id = ? AND state = ? AND attempts = ?",
            (message.state, message.attempts, messageId, current.state, current.attempts),
        )
        if cursor.rowcount == 1:
            kind, data = changeEvent(message)
            return message, [_insertEvent(cursor, kind, message.session, now, data)]


def _pendingSessions(cursor: sqlite3.Cursor) -> dict[str, tuple[int, int]]:
    cursor.execute(
        "SELECT session, COUNT(*), MAX(id) FROM queue WHERE state = ? GROUP BY session",
        (PENDING,),
    )
    return {session: (count, last) for session, count, last in cursor.fetchall()}


def _nextPending(
    cursor: sqlite3.Cursor, session: str, afterId: int
) -> QueuedMessage | None:
    cursor.execute(
        f"SELECT {_COLUMNS} FROM queue WHERE session = ? AND {OPEN} AND state = ? AND id > ?"
        " ORDER BY id LIMIT 1",
        (session, PENDING, afterId),
    )
    row = cursor.fetchone()
    return _row(row) if row else None


@implementer(IJournal)
class SQLiteJournal:
    """
    The journal in the SQLite database of the data directory.
    """

    def __init__(
        self,
        database: SQLiteDatabase,
        now: Callable[[], float] = time.time,
        eventSink: EventSink | None = None,
    ) -> None:
        self._db = database
        self._now = now
        #: Called with each event once the transaction that recorded it has
        #: committed, in id order.
        self.eventSink = eventSink

    def _write(self, operation: Callable[..., Any], *args: Any) -> Deferred:
        return self._db.write(operation, *args).addCallback(self._publish)

    def _publish(self, result: tuple[Any, list[Event]]) -> Any:
        return publishCommitted(self.eventSink, result)

    def append(
        self,
        session: str,
        content: str,
        received: float,
        idempotencyKey: str | None = None,
    ) -> Deferred:
        return self._write(_queued, session, content, received, idempotencyKey)

    def appendRecorded(
        self,
        session: str,
        content: str,
        received: float,
        idempotencyKey: str | None,
        record: Recorder,
        guard: Guard | None = None,
    ) -> Deferred:
        """
        L{append} a message and deliver it in the same transaction:
        C{record} (an adapter that stores what it is given in this
        database) writes it, and the message is delivered when it is on
        disk, with the events of a delivery (queued, started, the
        adapter's, done).  For a session with nothing else pending: one
        write instead of four.  If C{guard} says no, in that transaction,
        the message is only appended (its state is not delivered).
        """
        return self._write(
            _queuedAndRecorded, session, content, received, idempotencyKey, record, guard
        )

    def failedSessions(self) -> Deferred:
        return self._db.read(_failedSessions)

    def requeue(self, messageId: int) -> Deferred:
        return self._write(_changeState, messageId, REQUEUE, self._now())

    def discard(self, messageId: int) -> Deferred:
        return self._write(_changeState, messageId, DISCARD, self._now())

    def pending(self) -> Deferred:
        return self._db.read(_pending)

    def pendingSessions(self) -> Deferred:
        return self._db.read(_pendingSessions)

    def nextPending(self, session: str, afterId: int = 0) -> Deferred:
        return self._db.read(_nextPending, session, afterId)

    def markDelivered(self, messageId: int) -> Deferred:
        return self._write(_markDelivered, messageId, self._now())

    def recordFailure(self, messageId: int, error: str, final: bool) -> Deferred:
        return self._write(_recordFailure, messageId, error, final, self._now())

    def logEvent(
        self, kind: EventKind, session: str, data: dict[str, Any] | None = None
    ) -> Deferred:
        return self._write(_logEvent, EventKind(kind), session, self._now(), data or {})

    def messageHistory(self, messageId: int) -> Deferred:
        return self._db.read(_messageHistory, messageId)

    def eventsSince(
        self, afterId: int, session: str | None = None, limit: int = 1000
    ) -> Deferred:
        return self._db.readStatement(_eventsSince, afterId, session, limit)

    def pruneEvents(self, before: float) -> Deferred:
        """
        Forget the events recorded before C{before}, and the idempotency
        keys past their window.
        """
        return self._write(_pruneEvents, before, self._now() - IDEMPOTENCY_WINDOW)

    def messages(self, session: str) -> Deferred:
        return self._db.read(_undelivered, session)
