"""
SQLite, off the reactor thread, with group commit.

Every write runs on one writer thread.  Writes that arrive while a commit is
under way wait, and then go to disk together in one transaction: one fsync
for many messages, while each caller's Deferred still fires only once its own
write is committed.  One that fails does not undo the others in its group
(see L{runOperations}).  Reads run on their own threads (WAL mode
lets them proceed while a write commits).
"""

from __future__ import annotations

import os
import sqlite3
from time import perf_counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, Union

import attrs

from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorCore
from twisted.python.failure import Failure

from chatweb._priority import asWorker
from chatweb.errors import Refusal

T = TypeVar("T")
Operation = Callable[..., Any]



@attrs.frozen
class Upgrades:
    """
    Ordered schema upgrade steps, each a list of SQL statements.  The
    database's C{PRAGMA user_version} is how many have run: at open, the
    steps from that one on run (in the same transaction as the rest of the
    schema) and the version is set to C{len(steps)}.  A database made before
    versions existed is version 0.  One C{Upgrades} per database.
    """

    steps: tuple[tuple[str, ...], ...]

    @property
    def version(self) -> int:
        return len(self.steps)


def applyUpgrades(cursor: Any, upgrades: Upgrades, current: int) -> None:
    """
    Bring a database at schema version C{current} to C{upgrades.version}
    (the engine records the new version).

    @raise RuntimeError: if the database is newer than this chatweb.
    """
    if current > upgrades.version:
        raise RuntimeError(
            f"the database is schema version {current}, newer than this"
            f" chatweb's {upgrades.version}"
        )
    for step in upgrades.steps[current:]:
        for statement in step:
            cursor.execute(statement)


def applySchema(
    cursor: Any,
    schema: Sequence[Union[str, Upgrades]],
    upgrade: Callable[[Any, Upgrades], None],
) -> None:
    """
    Run each statement of C{schema}, and bring its L{Upgrades} up to date
    with C{upgrade} (the engine's way of keeping the version).
    """
    for statement in schema:
        if isinstance(statement, Upgrades):
            upgrade(cursor, statement)
        else:
            cursor.execute(statement)


def _upgrade(cursor: sqlite3.Cursor, upgrades: Upgrades) -> None:
    cursor.execute("PRAGMA user_version")
    current = cursor.fetchone()[0]
    applyUpgrades(cursor, upgrades, current)
    if current != upgrades.version:
        cursor.execute(f"PRAGMA user_version = {int(upgrades.version)}")


class DatabaseClosed(RuntimeError):
    """
    The database was closed: nothing more can be read or written.
    """

    def __init__(self) -> None:
        super().__init__("the database is closed")


def _configure(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk when it returns, even across a power cut.
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA busy_timeout=10000")


def runOperations(
    execute: Callable[[str], Any],
    cursor: Any,
    batch: Sequence[tuple[Operation, tuple[Any, ...]]],
    restart: Callable[[], None],
) -> list[tuple[bool, Any]]:
    """
    The operations of a batch in the caller's transaction, so that one
    that fails is undone alone and its caller gets its failure, while the
    others commit together.  C{execute} runs a statement (the same SQL on
    SQLite and PostgreSQL).

    They run first all together, without savepoints: a savepoint per
    operation cost as much as its writes (SQLite copies each page a
    savepoint may restore to a journal of its own; PostgreSQL takes a
    round trip for each).  An operation that refuses (a L{Refusal}, raised
    before it writes) fails alone.  Only if one fails otherwise is the
    transaction begun again (C{restart}) and the batch run once more, each
    operation in a savepoint of its own (operations read and write the
    database only: a second run from the same state does the same).
    """
    together: list[tuple[bool, Any]] = []
    try:
        for operation, args in batch:
            try:
                together.append((True, operation(cursor, *args)))
            except Refusal:
                together.append((False, Failure()))
        return together
    except Exception:
        restart()
    results: list[tuple[bool, Any]] = []
    for operation, args in batch:
        execute("SAVEPOINT operation")
        try:
            value = operation(cursor, *args)
        except Exception:
            execute("ROLLBACK TO operation")
            execute("RELEASE operation")
            results.append((False, Failure()))
        else:
            execute("RELEASE operation")
            results.append((True, value))
    return results


#: The operations that add to one or more sessions (their messages, their
#: queue), change their records or their leases, each with the function of
#: its arguments that names those sessions (and any other name that must be
#: written one write at a time, such as an idempotency key's).  Where
#: writers run at once (PostgreSQL, several instances), a transaction takes
#: a lock on each name of its batch before anything else, in one order (see
#: L{chatweb.store._postgresql}): what one session holds is numbered in the
#: order it was committed.  SQLite has one writer and needs none of it.
SESSION_WRITES: dict[Operation, Callable[[tuple[Any, ...]], Sequence[str]]] = {}


def sessionWrite(
    sessionsOf: Callable[[tuple[Any, ...]], Sequence[str]],
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """
    Record an operation in L{SESSION_WRITES}: C{sessionsOf(args)} names the
    sessions it changes (C{args}: its arguments after the cursor).
    """

    def record(operation: Callable[..., T]) -> Callable[..., T]:
        SESSION_WRITES[operation] = sessionsOf
        return operation

    return record


def firstArgument(args: tuple[Any, ...]) -> Sequence[str]:
    """
    For L{sessionWrite}: the session of an operation whose first argument
    is a session id, or has one (C{.session}).
    """
    first = args[0]
    return [first if isinstance(first, str) else first.session]


def _runBatch(
    connection: sqlite3.Connection, batch: Sequence[tuple[Operation, tuple[Any, ...]]]
) -> list[tuple[bool, Any]]:
    cursor = connection.cursor()

    def begin() -> None:
        if connection.in_transaction:
            cursor.execute("ROLLBACK")
        cursor.execute("BEGIN IMMEDIATE")

    begin()
    try:
        results = runOperations(cursor.execute, cursor, batch, begin)
        cursor.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.rollback()
        raise
    return results


def _runRead(connection: sqlite3.Connection, operation: Operation, args: tuple) -> Any:
    asWorker()
    cursor = connection.cursor()
    # One snapshot for all the statements of the read.
    cursor.execute("BEGIN")
    try:
        return operation(cursor, *args)
    finally:
        connection.rollback()


def _createPrivately(path: str) -> None:
    """
    Create the database file readable by its owner only (SQLite gives its
    -wal and -shm files the same mode), if it does not exist yet.
    """
    if path == ":memory:" or path.startswith("file:"):
        return
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        pass  # it exists, or cannot be made: open() says why.


class SQLiteDatabase:
    """
    One SQLite file, used from a writer thread and reader threads.

    @ivar path: the database file.
    """

    maxBatch = 1000
    #: Seconds of callbacks of a committed group run in one reactor turn.
    settleSlice = 0.005

    def __init__(self, path: str, reactor: IReactorCore, readers: int = 2) -> None:
        self.path = path
        self._reactor = reactor
        self._readers = readers
        #: False while the database server is known unreachable (the last
        #: attempt to reach it failed): C{GET /healthz} says so.  A file
        #: always is.
        self.reachable = True
        #: The writer's and the readers' connection pools, made by open():
        #: building a database touches no file and starts no thread.
        self._writer: ConnectionPool | None = None
        self._reader: ConnectionPool | None = None
        #: open() has made the pools: writes may go.
        self._started = False
        self._waiting: list[tuple[Operation, tuple[Any, ...], Deferred[Any]]] = []
        self._writing = False
        #: Committed groups whose Deferreds are still being fired.
        self._settling = 0
        self._drained: list[Deferred[None]] = []
        #: Callers waiting for open() to finish.
        self._openWaiters: list[Deferred[None]] = []
        self._opening = False
        self._isOpen = False
        self._openFailure: Failure | None = None
        self._closed = False
        #: Reads under way, and who waits for there to be none (close()).
        self._reading = 0
        self._readsDone: list[Deferred[None]] = []

    def _createFile(self) -> None:
        """
        Make the database's file, private, before anything opens it.
        """
        _createPrivately(self.path)

    def open(self, schema: Sequence[Union[str, Upgrades]]) -> Deferred[None]:
        """
        Create what C{schema} (a list of SQL statements, and L{Upgrades} to
        run after the statements before them) describes, once.
        Reads wait until this is done; writes queue behind it.  If it fails,
        the returned Deferred and every read fail with the same error.
        """
        if self._closed:
            return fail(DatabaseClosed())
        if self._opening or self._isOpen:
            return fail(RuntimeError("SQLiteDatabase.open() was already called"))
        self._opening = True
        # The file is made here, not when built (a service does no file I/O
        # until it starts), and before any connection can make it readable
        # by others.
        try:
            self._createFile()
        except OSError:
            self._openFailure = Failure()
            return fail(self._openFailure)
        try:
            self._startPools()
        except Exception:
            self._openFailure = Failure()
            return fail(self._openFailure)
        self._started = True

        create = self._creator(schema)

        def opened(result: None) -> None:
            self._isOpen = True
            self._settleOpen(None)

        def failed(failure: Failure) -> None:
            self._openFailure = failure
            self._settleOpen(failure)

        waiting = self._whenOpen()
        # The schema goes first, before writes asked for before open().
        created: Deferred[None] = Deferred()
        created.addCallbacks(opened, failed)
        self._waiting.insert(0, (create, (), created))
        self._flush()
        return waiting

    def _settleOpen(self, failure: Failure | None) -> None:
        waiters, self._openWaiters = self._openWaiters, []
        for waiter in waiters:
            if failure is None:
                waiter.callback(None)
            else:
                waiter.errback(failure)

    def _whenOpen(self) -> Deferred[None]:
        """
        A new Deferred that fires once open() has finished (or failed).
        """
        if self._closed:
            return fail(DatabaseClosed())
        if self._isOpen:
            return succeed(None)
        if self._openFailure is not None:
            return fail(self._openFailure)
        if not self._opening:
            return fail(RuntimeError("SQLiteDatabase.open() was not called"))
        waiter: Deferred[None] = Deferred()
        self._openWaiters.append(waiter)
        return waiter

    def write(self, operation: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run C{operation(cursor, *args)} in a write transaction on the writer
        thread.  The Deferred fires with its result once committed.
        """
        if self._closed:
            return fail(DatabaseClosed())
        result: Deferred[T] = Deferred()
        self._waiting.append((operation, args, result))
        self._flush()
        return result

    def read(self, operation: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run C{operation(cursor, *args)} on a reader thread, in one snapshot.
        """
        return self._read(self._runRead, operation, args)

    def readStatement(self, operation: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        L{read}, for an C{operation} of one statement (which sees one
        snapshot by itself): on PostgreSQL, one round trip instead of three
        (no transaction around it).
        """
        return self._read(self._runReadStatement, operation, args)

    def _runReadStatement(self, operation: Operation, args: tuple[Any, ...]) -> Deferred[Any]:
        return self._runRead(operation, args)

    def _read(
        self,
        runner: Callable[[Operation, tuple[Any, ...]], Deferred[Any]],
        operation: Callable[..., T],
        args: tuple[Any, ...],
    ) -> Deferred[T]:
        if self._closed:
            return fail(DatabaseClosed())

        def run(_: None) -> Deferred[T]:
            if self._closed:
                raise DatabaseClosed()
            return runner(operation, args)

        self._reading += 1
        return self._whenOpen().addCallback(run).addBoth(self._readDone)

    def _readDone(self, result: Any) -> Any:
        self._reading -= 1
        if self._reading == 0:
            waiting, self._readsDone = self._readsDone, []
            for d in waiting:
                d.callback(None)
        return result

    def _flush(self) -> None:
        if not self._started:
            # Not open yet: writes wait for open() to make the pools.
            return
        if self._writing or not self._waiting:
            if not self._writing and not self._waiting and not self._settling:
                drained, self._drained = self._drained, []
                for d in drained:
                    d.callback(None)
            return
        batch = self._waiting[: self.maxBatch]
        del self._waiting[: self.maxBatch]
        self._writing = True

        def committed(results: list[tuple[bool, Any]]) -> None:
            self._writing = False
            self._settling += 1
            self._settle([(d, ok, value) for (_, _, d), (ok, value) in zip(batch, results)])

        def failed(failure: Failure) -> None:
            # Each caller gets the failure, and logs it if it cannot handle it.
            self._writing = False
            for _, _, d in batch:
                d.errback(failure)
            self._flush()

        self._runBatch([(op, args) for op, args, _ in batch]).addCallbacks(
            committed, failed
        )

    def _settle(self, outcomes: list[tuple[Deferred[Any], bool, Any]]) -> None:
        """
        Fire the Deferreds of a committed group, for at most L{settleSlice}
        seconds in one turn of the reactor: a group of a thousand writes
        (each answering a request, starting a delivery, ...) would
        otherwise hold the reactor for tens of milliseconds.
        """
        deadline = perf_counter() + self.settleSlice
        for n, (d, ok, value) in enumerate(outcomes):
            if ok:
                d.callback(value)
            else:
                d.errback(value)
            if n + 1 < len(outcomes) and perf_counter() > deadline:
                self._reactor.callLater(  # type: ignore[attr-defined]
                    0, self._settle, outcomes[n + 1 :]
                )
                return
        self._settling -= 1
        self._flush()

    def close(self) -> Deferred[None]:
        """
        Finish the writes and reads already asked for, then close the
        connections.  Every call after this fails at once with
        L{DatabaseClosed}; open() cannot be called again (make a new
        L{SQLiteDatabase} instead).
        """
        if self._closed:
            return succeed(None)
        self._closed = True
        self._settleOpen(Failure(DatabaseClosed()))
        if not self._started:
            # Never opened (or it failed before any connection): nothing
            # to finish, and writes asked for meanwhile will never run.
            waiting, self._waiting = self._waiting, []
            for _, _, d in waiting:
                d.errback(DatabaseClosed())
            return succeed(None)
        drained: Deferred[None] = Deferred()
        self._drained.append(drained)
        self._flush()
        finished = [drained]
        if self._reading:
            readsDone: Deferred[None] = Deferred()
            self._readsDone.append(readsDone)
            finished.append(readsDone)

        return gatherResults(finished).addCallback(lambda _: self._closePools())

    # -- what is particular to the engine (L{PostgreSQLDatabase} has its own)

    def _startPools(self) -> None:
        common = dict(
            check_same_thread=False,
            isolation_level=None,
            cp_openfun=_configure,
            cp_reactor=self._reactor,
            cp_noisy=False,
        )
        self._writer = ConnectionPool(
            "sqlite3", self.path, cp_min=1, cp_max=1, cp_name="chatweb-writer", **common
        )
        self._reader = ConnectionPool(
            "sqlite3",
            self.path,
            cp_min=1,
            cp_max=self._readers,
            cp_name="chatweb-reader",
            **common,
        )

    def _creator(self, schema: Sequence[Union[str, Upgrades]]) -> Operation:
        def create(cursor: sqlite3.Cursor) -> None:
            applySchema(cursor, schema, _upgrade)

        return create

    def _runBatch(
        self, batch: list[tuple[Operation, tuple[Any, ...]]]
    ) -> Deferred[list[tuple[bool, Any]]]:
        assert self._writer is not None  # open() made it
        return self._writer.runWithConnection(_runBatch, batch)

    def _runRead(self, operation: Operation, args: tuple[Any, ...]) -> Deferred[Any]:
        assert self._reader is not None  # open() made it
        return self._reader.runWithConnection(_runRead, operation, args)

    def _closePools(self) -> None:
        for pool in (self._writer, self._reader):
            if pool is not None:
                pool.close()
