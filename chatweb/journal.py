"""
The queue's durable journal: every accepted message is a row here before its
204 is sent, and stays until it is delivered or has failed for good.
"""

from __future__ import annotations

import sqlite3

from twisted.internet.defer import Deferred
from zope.interface import implementer

from chatweb.database import SQLiteDatabase
from chatweb.interfaces import IJournal
from chatweb.model import DELIVERED, FAILED, PENDING, QueuedMessage

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
]

_COLUMNS = "id, session, content, received, state, attempts, last_error"


def _row(row: tuple) -> QueuedMessage:
    return QueuedMessage(*row)


def _append(
    cursor: sqlite3.Cursor, session: str, content: str, received: float
) -> QueuedMessage:
    cursor.execute(
        "INSERT INTO queue (session, content, received) VALUES (?, ?, ?)",
        (session, content, received),
    )
    assert cursor.lastrowid is not None
    return QueuedMessage(cursor.lastrowid, session, content, received)


def _pending(cursor: sqlite3.Cursor) -> list[QueuedMessage]:
    cursor.execute(
        f"SELECT {_COLUMNS} FROM queue WHERE state = ? ORDER BY id", (PENDING,)
    )
    return [_row(r) for r in cursor.fetchall()]


def _undelivered(cursor: sqlite3.Cursor, session: str) -> list[QueuedMessage]:
    cursor.execute(
        f"SELECT {_COLUMNS} FROM queue WHERE session = ? AND state != ? ORDER BY id",
        (session, DELIVERED),
    )
    return [_row(r) for r in cursor.fetchall()]


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


@implementer(IJournal)
class SQLiteJournal:
    """
    The journal in the SQLite database of the data directory.
    """

    def __init__(self, database: SQLiteDatabase) -> None:
        self._db = database

    def append(self, session: str, content: str, received: float) -> Deferred:
        return self._db.write(_append, session, content, received)

    def pending(self) -> Deferred:
        return self._db.read(_pending)

    def markDelivered(self, messageId: int) -> Deferred:
        return self._db.write(_markDelivered, messageId)

    def recordFailure(self, messageId: int, error: str, final: bool) -> Deferred:
        return self._db.write(_recordFailure, messageId, error, final)

    def messages(self, session: str) -> Deferred:
        return self._db.read(_undelivered, session)
