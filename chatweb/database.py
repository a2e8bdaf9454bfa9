"""
SQLite, off the reactor thread, with group commit.

Every write runs on one writer thread.  Writes that arrive while a commit is
under way wait, and then go to disk together in one transaction: one fsync
for many messages, while each caller's Deferred still fires only once its own
write is committed.  Each write runs in a savepoint, so one that fails does
not undo the others in its group.  Reads run on their own threads (WAL mode
lets them proceed while a write commits).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")
Operation = Callable[..., Any]

_log = Logger()


def _configure(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk when it returns, even across a power cut.
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA busy_timeout=10000")


def _runBatch(
    connection: sqlite3.Connection, batch: Sequence[tuple[Operation, tuple[Any, ...]]]
) -> list[tuple[bool, Any]]:
    cursor = connection.cursor()
    cursor.execute("BEGIN IMMEDIATE")
    results: list[tuple[bool, Any]] = []
    try:
        for operation, args in batch:
            cursor.execute("SAVEPOINT operation")
            try:
                value = operation(cursor, *args)
            except Exception:
                cursor.execute("ROLLBACK TO operation")
                cursor.execute("RELEASE operation")
                results.append((False, Failure()))
            else:
                cursor.execute("RELEASE operation")
                results.append((True, value))
        cursor.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.rollback()
        raise
    return results


def _runRead(connection: sqlite3.Connection, operation: Operation, args: tuple) -> Any:
    cursor = connection.cursor()
    # One snapshot for all the statements of the read.
    cursor.execute("BEGIN")
    try:
        return operation(cursor, *args)
    finally:
        connection.rollback()


class SQLiteDatabase:
    """
    One SQLite file, used from a writer thread and reader threads.

    @ivar path: the database file.
    """

    maxBatch = 1000

    def __init__(self, path: str, reactor: IReactorCore, readers: int = 2) -> None:
        self.path = path
        common = dict(
            check_same_thread=False,
            isolation_level=None,
            cp_openfun=_configure,
            cp_reactor=reactor,
            cp_noisy=False,
        )
        self._writer = ConnectionPool(
            "sqlite3", path, cp_min=1, cp_max=1, cp_name="chatweb-writer", **common
        )
        self._reader = ConnectionPool(
            "sqlite3", path, cp_min=1, cp_max=readers, cp_name="chatweb-reader", **common
        )
        self._waiting: list[tuple[Operation, tuple[Any, ...], Deferred[Any]]] = []
        self._writing = False
        self._drained: list[Deferred[None]] = []
        self._opened: Deferred[None] | None = None
        self._isOpen = False
        self._closed = False

    def open(self, schema: Sequence[str]) -> Deferred[None]:
        """
        Create what C{schema} (a list of SQL statements) describes, once.
        Reads wait until this is done; writes queue behind it.
        """

        def create(cursor: sqlite3.Cursor) -> None:
            for statement in schema:
                cursor.execute(statement)

        def opened(result: None) -> None:
            self._isOpen = True
            waiting, self._opened = self._opened, None
            assert waiting is not None
            waiting.callback(None)

        self._opened = Deferred()
        self.write(create).addCallbacks(opened, self._opened.errback)
        return self._whenOpen()

    def _whenOpen(self) -> Deferred[None]:
        if self._isOpen:
            return succeed(None)
        if self._opened is None:
            raise RuntimeError("SQLiteDatabase.open() was not called")
        done: Deferred[None] = Deferred()

        def passOn(result: Any) -> Any:
            done.callback(result)
            return result

        self._opened.addBoth(passOn)
        return done

    def write(self, operation: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run C{operation(cursor, *args)} in a write transaction on the writer
        thread.  The Deferred fires with its result once committed.
        """
        if self._closed:
            return fail(RuntimeError("the database is closed"))
        result: Deferred[T] = Deferred()
        self._waiting.append((operation, args, result))
        self._flush()
        return result

    def read(self, operation: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run C{operation(cursor, *args)} on a reader thread, in one snapshot.
        """
        return self._whenOpen().addCallback(
            lambda _: self._reader.runWithConnection(_runRead, operation, args)
        )

    def _flush(self) -> None:
        if self._writing or not self._waiting:
            if not self._writing and not self._waiting:
                drained, self._drained = self._drained, []
                for d in drained:
                    d.callback(None)
            return
        batch = self._waiting[: self.maxBatch]
        del self._waiting[: self.maxBatch]
        self._writing = True

        def committed(results: list[tuple[bool, Any]]) -> None:
            self._writing = False
            for (_, _, d), (ok, value) in zip(batch, results):
                if ok:
                    d.callback(value)
                else:
                    d.errback(value)
            self._flush()

        def failed(failure: Failure) -> None:
            self._writing = False
            _log.failure("A write transaction failed", failure)
            for _, _, d in batch:
                d.errback(failure)
            self._flush()

        self._writer.runWithConnection(
            _runBatch, [(op, args) for op, args, _ in batch]
        ).addCallbacks(committed, failed)

    def close(self) -> Deferred[None]:
        """
        Finish the writes already asked for, then close the connections.
        """
        if self._closed:
            return succeed(None)
        self._closed = True
        drained: Deferred[None] = Deferred()
        self._drained.append(drained)
        self._flush()

        def closeBoth(_: None) -> None:
            for pool in (self._writer, self._reader):
                pool.close()

        return drained.addCallback(closeBoth)
