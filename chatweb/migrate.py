"""
C{python -m chatweb migrate --to postgresql://...}: move a data directory's
SQLite store (sessions and their messages, the queue with its pending and
failed messages, idempotency keys, the event log) into an empty PostgreSQL
database, ids kept, in one transaction: all of it or nothing.

Stop chatweb on that data directory first: what it writes during the copy
would not be copied.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from chatweb.config import DATABASE_NAME, ConfigError

#: The tables copied, their columns, and their integer key (its sequence
#: is moved past the copied ids).
TABLES: list[tuple[str, tuple[str, ...], str | None]] = [
    ("sessions", ("id", "created", "meta"), None),
    ("messages", ("seq", "session", "delivery", "reply_to", "data"), "seq"),
    ("queue", ("id", "session", "content", "received", "state", "attempts",
               "last_error"), "id"),
    ("idempotency", ("key", "session", "message", "digest", "created"), None),
    ("events", ("id", "kind", "session", "time", "data"), "id"),
]


async def runMigrate(
    reactor: Any, dataDir: str, dsn: str, password: str | None = None
) -> dict[str, int]:
    """
    Copy the store of C{dataDir} into the database C{dsn} (made, or
    upgraded, to chatweb's schema first); how many rows of each table.

    @raise ConfigError: no store there, or the target is not empty.
    """
    from twisted.internet.threads import deferToThread

    from chatweb._datalock import DataDirInUse, DataDirLock
    from chatweb.backends.local import SCHEMA as SESSIONS_SCHEMA
    from chatweb.store._journal import SCHEMA as JOURNAL_SCHEMA
    from chatweb.store._postgresql import LEASE_SCHEMA, PostgreSQLDatabase
    from chatweb.store._sqlite import SQLiteDatabase

    path = os.path.join(dataDir, DATABASE_NAME)
    if not os.path.isfile(path):
        raise ConfigError(f"no chatweb database in {dataDir} ({DATABASE_NAME})")
    # Not while chatweb runs on it: what it stores meanwhile would be left
    # behind.
    lock = DataDirLock(dataDir)
    try:
        lock.acquire()
    except DataDirInUse as e:
        raise ConfigError(f"{e}: stop it first") from None
    try:
        # Both schemas brought up to date (an old SQLite store is upgraded
        # in place, as chatweb itself would at start).
        source = SQLiteDatabase(path, reactor)
        try:
            await source.open(JOURNAL_SCHEMA + SESSIONS_SCHEMA)
        finally:
            await source.close()
        target = PostgreSQLDatabase(dsn, reactor, password)
        try:
            await target.open(JOURNAL_SCHEMA + SESSIONS_SCHEMA + LEASE_SCHEMA)
        finally:
            await target.close()
        result: dict[str, int] = await deferToThread(_copy, path, target)
    finally:
        lock.release()
    return result


def _copy(path: str, target: Any) -> dict[str, int]:
    from chatweb.store._postgresql import TranslatingCursor

    counts: dict[str, int] = {}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as source:
        source.execute("BEGIN")  # one snapshot of every table
        with target.connect() as connection:
            raw = connection.cursor()
            cursor = TranslatingCursor(raw)
            raw.execute("BEGIN")
            for table, _, _ in TABLES:
                raw.execute(f"SELECT 1 FROM {table} LIMIT 1")
                if raw.fetchone() is not None:
                    connection.rollback()
                    raise ConfigError(
                        f"the target database already holds chatweb data"
                        f" (table {table}): migrate into an empty database"
                    )
            for table, columns, key in TABLES:
                names = ", ".join(columns)
                rows = source.execute(f"SELECT {names} FROM {table}").fetchall()
                cursor.executemany(
                    f"INSERT INTO {table} ({names}) VALUES"
                    f" ({', '.join('?' * len(columns))})",
                    rows,
                )
                counts[table] = len(rows)
                if key is not None:
                    raw.execute(
                        f"SELECT setval(pg_get_serial_sequence('{table}', '{key}'),"
                        f" GREATEST(MAX({key}), 1), MAX({key}) IS NOT NULL) FROM {table}"
                    )
            raw.execute("COMMIT")
    return counts
