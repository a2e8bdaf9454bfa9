"""
The queue's durable journal: every accepted message is a row here before its
204 is sent, and stays until it is delivered or has failed for good.
"""

from __future__ import annotations

import hashlib
import sqlite3

import attrs

from twisted.internet.defer import Deferred
from zope.interface import implementer

from chatweb.store._sqlite import SQLiteDatabase
from chatweb.errors import IdempotencyConflict, UnknownMessage, WrongState
from chatweb.interfaces import IJournal
from chatweb.model._values import DELIVERED, DISCARDED, FAILED, PENDING, QueuedMessage

SCHEMA = [
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
    "CREATE INDEX IF NOT EXISTS queue_by_session ON queue (session, id)",
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
]

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


def _append(
    cursor: sqlite3.Cursor,
    session: str,
    content: str,
    received: float,
    idempotencyKey: str | None,
) -> QueuedMessage:
    if idempotencyKey is not None:
        cursor.execute(
            "DELETE FROM idempotency WHERE created < ?",
            (received - IDEMPOTENCY_WINDOW,),
        )
        cursor.execute(
            "SELECT session, message, digest FROM idempotency WHERE key = ?",
            (idempotencyKey,),
        )
        seen = cursor.fetchone()
        if seen is not None:
            if seen[0] != session or seen[2] != contentDigest(content):
                raise IdempotencyConflict(idempotencyKey)
            earlier = _get(cursor, seen[1])
            if earlier is not None:
                return attrs.evolve(earlier, duplicate=True)
    cursor.execute(
        "INSERT INTO queue (session, content, received) VALUES (?, ?, ?)",
        (session, content, received),
    )
    messageId = cursor.lastrowid
    assert messageId is not None
    if idempotencyKey is not None:
        cursor.execute(
            "INSERT OR REPLACE INTO idempotency (key, session, message, digest, created)"
            " VALUES (?, ?, ?, ?, ?)",
            (idempotencyKey, session, messageId, contentDigest(content), received),
        )
    return QueuedMessage(messageId, session, content, received)


def _pending(cursor: sqlite3.Cursor) -> list[QueuedMessage]:
    cursor.execute(
        f"SELECT {_COLUMNS} FROM queue WHERE state = ? ORDER BY id", (PENDING,)
    )
    return [_row(r) for r in cursor.fetchall()]


def _undelivered(cursor: sqlite3.Cursor, session: str) -> list[QueuedMessage]:
    cursor.execute(
        f"SELECT {_COLUMNS} FROM queue WHERE session = ? AND state IN (?, ?)"
        " ORDER BY id",
        (session, PENDING, FAILED),
    )
    return [_row(r) for r in cursor.fetchall()]


def _failedSessions(cursor: sqlite3.Cursor) -> list[str]:
    cursor.execute("SELECT DISTINCT session FROM queue WHERE state = ?", (FAILED,))
    return [row[0] for row in cursor.fetchall()]


def _markDelivered(cursor: sqlite3.Cursor, messageId: int) -> None:
    cursor.execute(
        "UPDATE queue SET state = ? WHERE id = ?", (DELIVERED, messageId)
    )


def _recordFailure(
    cursor: sqlite3.Cursor, messageId: int, error: str, final: bool
) -> QueuedMessage:
    cursor.execute(
        "UPDATE queue SET attempts = attempts + 1, last_error = ?, state = ?"
        " WHERE id = ?",
        (error, FAILED if final else PENDING, messageId),
    )
    cursor.execute(f"SELECT {_COLUMNS} FROM queue WHERE id = ?", (messageId,))
    return _row(cursor.fetchone())


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
    return attrs.evolve(message, state=state, attempts=attempts)


def _changeState(cursor: sqlite3.Cursor, messageId: int, change: Change) -> QueuedMessage:
    message = changed(_get(cursor, messageId), messageId, change)
    cursor.execute(
        "UPDATE queue SET state = ?, attempts = ? WHERE id = ?",
        (message.state, message.attempts, messageId),
    )
    return message


@implementer(IJournal)
class SQLiteJournal:
    """
    The journal in the SQLite database of the data directory.
    """

    def __init__(self, database: SQLiteDatabase) -> None:
        self._db = database

    def append(
        self,
        session: str,
        content: str,
        received: float,
        idempotencyKey: str | None = None,
    ) -> Deferred:
        return self._db.write(_append, session, content, received, idempotencyKey)

    def failedSessions(self) -> Deferred:
        return self._db.read(_failedSessions)

    def requeue(self, messageId: int) -> Deferred:
        return self._db.write(_changeState, messageId, REQUEUE)

    def discard(self, messageId: int) -> Deferred:
        return self._db.write(_changeState, messageId, DISCARD)

    def pending(self) -> Deferred:
        return self._db.read(_pending)

    def markDelivered(self, messageId: int) -> Deferred:
        return self._db.write(_markDelivered, messageId)

    def recordFailure(self, messageId: int, error: str, final: bool) -> Deferred:
        return self._db.write(_recordFailure, messageId, error, final)

    def messages(self, session: str) -> Deferred:
        return self._db.read(_undelivered, session)
