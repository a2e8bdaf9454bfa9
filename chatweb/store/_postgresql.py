"""
PostgreSQL, for several chatweb instances sharing one store.

The same operations as on SQLite (the journal's and the local backend's
functions of a cursor) run here unchanged: L{PostgreSQLDatabase} hands them
a cursor that speaks their SQL dialect (C{?} parameters, C{INSERT OR
IGNORE}, C{lastrowid}, ...) and translates it to PostgreSQL's, so both
engines keep one definition of what each change does.

psycopg 3 is used from threads of Twisted thread pools (one writer thread
with a connection of its own, a few reader threads sharing a connection
pool), never on the reactor thread: the same shape as the SQLite engine,
and the driver's synchronous API is its best-tested one.

Each connection keeps the statements psycopg prepares for it (after a few
uses, so the server parses and plans them once): reads end their
read-only transaction with COMMIT, since psycopg forgets a connection's
prepared statements at every ROLLBACK; and a pooled connection is checked
with a round trip only when it has been idle a while (L{IDLE_CHECK}).

Instances write at once, each in groups (one transaction, one fsync for
many), as on SQLite.  Two kinds of transaction-scoped advisory lock keep
what must stay in order:
- each session's (L{sessionLockKey}), taken at a write's start for every
  session its operations add to or whose record or lease they change
  (L{SESSION_WRITES}), all in one order, so that writes wait for each
  other's locks without ever deadlocking on them: a session's new
  messages, records and lease are written one write at a time, and its
  rows are numbered in the order they commit (a message's change of
  state, a single row's, is guarded by the row: see
  L{chatweb.store._journal._changeState});
- the event log's (L{EVENTS_LOCK}), taken only to commit: a write's events
  are kept aside while its operations run and inserted at its end, with
  the lock held to the COMMIT, so event ids are given in commit order: a
  reader that has seen event id N never later finds a smaller one
  committed (the event streams rely on that).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from time import monotonic
from typing import Any, Union
from urllib.parse import urlsplit, urlunsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from chatweb._priority import asWorker
from chatweb.model import PENDING
from chatweb.model._values import Event
from chatweb.store._journal import OPEN
from chatweb.store._unreachable import logFailure
from chatweb.store._sqlite import (
    SESSION_WRITES,
    SQLiteDatabase,
    Upgrades,
    applySchema,
    applyUpgrades,
    firstArgument,
    runOperations,
    sessionWrite,
)

_log = Logger()

Operation = Callable[..., Any]

#: pg_advisory_lock keys: the schema (held while it is made or upgraded, so
#: instances starting at once take turns) and the event log (held from a
#: write's events' INSERT to its COMMIT).
SCHEMA_LOCK = 0x63687765_0001
EVENTS_LOCK = 0x63687765_0002

#: The first of the two keys of each session's lock (the second is
#: L{sessionLockKey}'s): a space of its own, apart from the keys above.
SESSION_LOCKS = 0x63687765

#: Seconds a pooled connection may sit idle and still be used without a
#: check (a round trip) first: one just used is alive, or it fails at the
#: read's start and the read goes on another (L{_began}); one idle longer
#: may have lost its server meanwhile (a restart, an idle timeout), as may
#: the others in the pool, and is replaced before it is used.
IDLE_CHECK = 1.0

#: How write and read transactions begin.  Writes read what others
#: committed up to each statement (READ COMMITTED, whatever the server's
#: default): taken before a session's lock is granted, a snapshot would
#: miss what the lock's last holder committed (see L{_deliverableHere}).
BEGIN_WRITE = "BEGIN ISOLATION LEVEL READ COMMITTED"
BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

#: The statement of chatweb's that records events (the journal's
#: C{_insertEvent(s)}): kept aside by a write's cursor (L{TranslatingCursor}).
_EVENTS_INSERT = "INSERT INTO events (kind, session, time, data) VALUES"

#: Most events in one INSERT at a write's end.
_EVENTS_PER_INSERT = 1000

#: Most characters of events sent in the one query that ends a write
#: (more go in INSERTs of their own first: PostgreSQL takes at most 1 GB
#: in one message).
_EVENTS_IN_LAST_QUERY = 4 * 1024 * 1024

#: Most session locks in one SELECT (PostgreSQL's limit is 1664).
_LOCKS_PER_SELECT = 1000


#: Where committed changes are announced (LISTEN/NOTIFY).
CHANNEL = "chatweb_events"

#: Most seconds between tries to read new events while reading fails.
RETRY_LONGEST = 10.0

#: Seconds a read waits for a pooled connection: one is made in
#: milliseconds while the server is up, so when it is down a read fails
#: (a 503) after this rather than after the connect timeout; and for this
#: long after such a wait, reads fail at once instead of waiting again.
READ_WAIT = 5.0

#: libpq's TCP settings for every connection, unless the DSN gives its
#: own: TCP alone notices a partition or a server gone without a word only
#: after 15 minutes (a request under way) or 2 hours (an idle connection,
#: such as the listener's).  With these, a request whose data the server
#: does not acknowledge fails after 20 s (a 503), and an idle connection to
#: a server gone is found dead within about 20 s.  libpq ignores them on a
#: unix socket.
TCP_SETTINGS = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
    "tcp_user_timeout": 20_000,  # ms; libpq 12 and later
}

#: Tables whose integer key an INSERT returns as C{lastrowid}.
_KEYS = {"queue": "id", "events": "id", "messages": "seq"}

_INSERT_OR_IGNORE = re.compile(r"^\s*INSERT OR IGNORE INTO (.*)$", re.S)
_INSERT_OR_REPLACE = re.compile(
    r"^\s*INSERT OR REPLACE INTO (\w+) \(([^)]*)\)(.*)$", re.S
)
_INSERT = re.compile(r"^\s*INSERT INTO (\w+)")


def isPostgreSQL(database: str) -> bool:
    """
    Whether C{database} (a C{--database} value) names a PostgreSQL server.
    """
    return database.startswith(("postgresql://", "postgres://"))


def redact(dsn: str) -> str:
    """
    C{dsn} with any password in it replaced by C{***}: what may be shown or
    logged.
    """
    if isPostgreSQL(dsn):
        parts = urlsplit(dsn)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":***"
            netloc = f"{userinfo}@{host}"
        query = re.sub(r"(?i)(^|&)password=[^&]*", r"\1password=***", parts.query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    return re.sub(r"(?i)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", "password=***", dsn)


@functools.lru_cache(maxsize=512)
def translate(sql: str, returning: bool = True) -> tuple[str, str | None]:
    """
    The PostgreSQL form of one SQLite statement of chatweb's, and the key
    column its INSERT returns (None: not an INSERT with a key).
    """
    sql = sql.replace("json_extract(data, '$.message') = ?",
                      "(data::json->>'message') = (?)::text")
    ddl = sql.lstrip().upper().startswith("CREATE")
    if ddl:
        sql = sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
        sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
        sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)
        # SQLite compares text by code point; so does the "C" collation,
        # whatever the database's locale (en_US would order "B" < "a" < "C").
        sql = re.sub(r"\bTEXT\b", 'TEXT COLLATE "C"', sql)
    key = None
    match = _INSERT_OR_REPLACE.match(sql)
    if match:
        table, columns, rest = match.groups()
        names = [c.strip() for c in columns.split(",")]
        # The first column is the table's primary key.
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in names[1:])
        sql = (f"INSERT INTO {table} ({columns}){rest.rstrip()}"
               f" ON CONFLICT ({names[0]}) DO UPDATE SET {updates}")
    else:
        match = _INSERT_OR_IGNORE.match(sql)
        if match:
            sql = f"INSERT INTO {match.group(1).rstrip()} ON CONFLICT DO NOTHING"
    insert = _INSERT.match(sql)
    if returning and insert and insert.group(1) in _KEYS:
        key = _KEYS[insert.group(1)]
        sql = f"{sql.rstrip()} RETURNING {key}"
    return sql.replace("%", "%%").replace("?", "%s"), key


_INTO_EVENTS = re.compile(r"^\s*INSERT\s+(?:OR\s+\w+\s+)?INTO\s+events\b", re.I)


@functools.lru_cache(maxsize=512)
def _recordsEvents(sql: str) -> bool:
    """
    Whether C{sql} inserts into the event log; it must be the journal's
    statement (L{_EVENTS_INSERT}), whose rows a write keeps aside.
    """
    if _INTO_EVENTS.match(sql) is None:
        return False
    if not sql.startswith(_EVENTS_INSERT):
        raise ValueError(f"events are recorded with {_EVENTS_INSERT} only")
    return True


def _encode(value: Any) -> Any:
    # PostgreSQL text cannot hold U+0000: it is kept as U+FFFE U+0001, and
    # U+FFFE itself as U+FFFE U+0002, so every string comes back as stored.
    if isinstance(value, str) and ("\x00" in value or "\ufffe" in value):
        return value.replace("\ufffe", "\ufffe\x02").replace("\x00", "\ufffe\x01")
    return value


def _decodeValue(value: Any) -> Any:
    if isinstance(value, str) and "\ufffe" in value:
        return value.replace("\ufffe\x01", "\x00").replace("\ufffe\x02", "\ufffe")
    return value


def _decode(row: Any) -> Any:
    if row is None:
        return None
    return tuple(_decodeValue(v) for v in row)


class TranslatingCursor:
    """
    A psycopg cursor that takes chatweb's SQLite statements (see
    L{translate}), and offers C{lastrowid} as sqlite3's cursor does.

    A write's cursor (C{keepEvents}) keeps the events its operations
    record in L{events}, each with an id for the time being, for the write
    to insert at its end (L{PostgreSQLDatabase._batchInThread}); it keeps
    what savepoints undo in step with them.
    """

    def __init__(self, cursor: Any, keepEvents: bool = False) -> None:
        self._cursor = cursor
        self.lastrowid: int | None = None
        #: The keys of every row the last INSERT added, or None.
        self.insertedIds: list[int] | None = None
        #: The events kept aside: their ids for now (negative, increasing),
        #: and their rows (kind, session, time, data), in order.
        self.events: list[tuple[int, list[Any]]] | None = [] if keepEvents else None
        self._savepoints: list[int] = []
        self._nextId = -(1 << 62)

    def forgetEvents(self) -> None:
        """
        The transaction was rolled back: so are the events kept aside.
        """
        if self.events is not None:
            self.events.clear()
            self._savepoints.clear()

    def _keepEvents(self, params: Sequence[Any]) -> None:
        assert self.events is not None
        ids = []
        for i in range(0, len(params), 4):
            self._nextId += 1
            ids.append(self._nextId)
            self.events.append((self._nextId, [_encode(p) for p in params[i:i + 4]]))
        self.insertedIds = ids
        self.lastrowid = ids[-1] if ids else None

    def _savepoint(self, sql: str) -> None:
        assert self.events is not None
        if sql.startswith("SAVEPOINT "):
            self._savepoints.append(len(self.events))
        elif sql.startswith("ROLLBACK TO ") and self._savepoints:
            del self.events[self._savepoints[-1]:]
        elif sql.startswith("RELEASE ") and self._savepoints:
            self._savepoints.pop()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> "TranslatingCursor":
        if self.events is not None:
            if _recordsEvents(sql):
                self._keepEvents(params)
                return self
            self._savepoint(sql)
        statement, key = translate(sql)
        self._cursor.execute(statement, [_encode(p) for p in params])
        self.lastrowid = self.insertedIds = None
        if key is not None:
            self.insertedIds = [row[0] for row in self._cursor.fetchall()]
            # As sqlite3's: the last row's.
            self.lastrowid = self.insertedIds[-1] if self.insertedIds else None
        return self

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if self.events is not None and _recordsEvents(sql):
            raise ValueError(f"events are recorded with {_EVENTS_INSERT} only")
        statement, _ = translate(sql, returning=False)
        rows = [[_encode(p) for p in row] for row in rows]
        if rows:
            self._cursor.executemany(statement, rows)

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)

    def fetchone(self) -> Any:
        return _decode(self._cursor.fetchone())

    def fetchall(self) -> list[Any]:
        return [_decode(r) for r in self._cursor.fetchall()]


def _upgrade(cursor: Any, upgrades: Upgrades) -> None:
    cursor.execute(
        "CREATE TABLE IF NOT EXISTS chatweb_schema (version BIGINT NOT NULL)"
    )
    cursor.execute("SELECT version FROM chatweb_schema")
    row = cursor.fetchone()
    current = 0 if row is None else row[0]
    applyUpgrades(cursor, upgrades, current)
    if row is None:
        cursor.execute("INSERT INTO chatweb_schema (version) VALUES (?)",
                       (upgrades.version,))
    elif current != upgrades.version:
        cursor.execute("UPDATE chatweb_schema SET version = ?", (upgrades.version,))


class PostgreSQLDatabase(SQLiteDatabase):
    """
    A PostgreSQL database, used like L{SQLiteDatabase} (C{open}, C{read},
    C{write}, C{close}) by the journal and the local backend.

    @ivar path: the DSN without its password (for messages).
    """

    def __init__(
        self,
        dsn: str,
        reactor: IReactorCore,
        password: str | None = None,
        readers: int = 4,
        connectTimeout: float = 30.0,
    ) -> None:
        super().__init__(redact(dsn), reactor, readers)
        self._dsn = dsn
        self._password = password
        self._connectTimeout = connectTimeout
        self._pool: Any = None
        #: See L{READ_WAIT}.
        self.readWait = READ_WAIT
        self._noConnectionUntil = 0.0
        #: The writer thread's own connection (made at the first write,
        #: made again after it breaks).
        self._writerConnection: Any = None
        #: When each pooled connection was last used (see L{IDLE_CHECK},
        #: the default of C{idleCheck}).
        self._returned: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self.idleCheck = IDLE_CHECK
        self._writeThreads: ThreadPool | None = None
        self._readThreads: ThreadPool | None = None
        #: Each write transaction ends with a NOTIFY on L{CHANNEL}, so the
        #: other instances' listeners learn of it once it has committed.
        self.notify = True
        #: The NOTIFY's payload: a listener tells its own instance's
        #: commits from the others'.
        self.instance = uuid.uuid4().hex

    def _createFile(self) -> None:
        # No file: self.path is the DSN (made into directories and an empty
        # file under the working directory before).
        pass

    def connectionArguments(self) -> dict[str, Any]:
        """
        What psycopg.connect needs besides the DSN (the password, if given
        apart from it).
        """
        from psycopg import pq
        from psycopg.conninfo import conninfo_to_dict

        kwargs: dict[str, Any] = {"autocommit": True}
        if self._password is not None:
            kwargs["password"] = self._password
        given = conninfo_to_dict(self._dsn)
        if "application_name" not in given:
            # Which instance a session in pg_stat_activity is (at most 63
            # bytes are kept).
            kwargs["application_name"] = f"chatweb {socket.gethostname()}:{os.getpid()}"[:60]
        if "connect_timeout" not in given:
            # Not libpq's default (none; psycopg's 130 s): a writer that
            # reconnects to an unreachable server holds every write.
            kwargs["connect_timeout"] = max(1, int(self._connectTimeout))
        for name, value in TCP_SETTINGS.items():
            if name not in given and (name != "tcp_user_timeout" or pq.version() >= 120000):
                kwargs[name] = value
        return kwargs

    def connect(self) -> Any:
        """
        A new connection of its own (blocking: call it off the reactor),
        for a listener.
        """
        import psycopg

        return psycopg.connect(self._dsn, **self.connectionArguments())

    def _startPools(self) -> None:
        from psycopg_pool import ConnectionPool

        self._pool = ConnectionPool(
            self._dsn,
            kwargs=self.connectionArguments(),
            min_size=1,
            max_size=self._readers,
            open=False,
            timeout=self._connectTimeout,
            name="chatweb",
            check=self._checkIfIdle,
        )
        self._writeThreads = ThreadPool(1, 1, "chatweb-pg-writer")
        self._readThreads = ThreadPool(1, self._readers, "chatweb-pg-reader")
        self._writeThreads.start()
        self._readThreads.start()

    def _checkIfIdle(self, connection: Any) -> None:
        from psycopg_pool import ConnectionPool

        if monotonic() - self._returned.get(connection, 0.0) > self.idleCheck:
            ConnectionPool.check_connection(connection)

    def _connectedWriter(self) -> Any:
        """
        The writer thread's connection, made if there is none or it is
        closed (its server gone) or left in a transaction.  It is not
        checked first: if it fails at the transaction's start, the batch
        goes on a new one (L{_began}).
        """
        from psycopg.pq import TransactionStatus

        connection = self._writerConnection
        if connection is not None and (
            connection.info.transaction_status != TransactionStatus.IDLE
        ):
            connection.close()
        if connection is None or connection.closed:
            self._writerConnection = None
            # The first write (the schema) makes it, so that a wrong
            # address or password fails at once, saying why, rather than
            # after the pool's timeout.
            self._writerConnection = connection = self.connect()
        if self._pool.closed:
            self._pool.open(wait=True, timeout=self._connectTimeout)
        return connection

    def _creator(self, schema: Sequence[Union[str, Upgrades]]) -> Operation:
        def create(cursor: TranslatingCursor) -> None:
            # Instances starting at once take turns; the lock goes with
            # the transaction.
            cursor.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))
            applySchema(cursor, schema, _upgrade)

        return create

    def _inThread(self, threads: ThreadPool | None, f: Operation, *args: Any) -> Deferred:
        assert threads is not None  # open() made it
        return deferToThreadPool(self._reactor, threads, f, *args)  # type: ignore[arg-type]

    def _runBatch(
        self, batch: list[tuple[Operation, tuple[Any, ...]]]
    ) -> Deferred[list[tuple[bool, Any]]]:
        return self._inThread(self._writeThreads, self._batchInThread, batch)

    def _end(self, withEvents: bool = False) -> str:
        if not self.notify:
            return "COMMIT"
        # Delivered to listeners when (and only if) this commits: this
        # instance's id, and the id of the last event the write recorded
        # (see SharedEvents).  Both are chatweb's own (a constant, a hex
        # uuid, a number): no quoting.
        payload = f"'{self.instance}'"
        if withEvents:
            payload += " || ' ' || currval(pg_get_serial_sequence('events', 'id'))"
        return f"SELECT pg_notify('{CHANNEL}', {payload}); COMMIT"

    def _batchInThread(
        self, batch: list[tuple[Operation, tuple[Any, ...]]]
    ) -> list[tuple[bool, Any]]:
        try:
            results = self._writeBatch(batch)
        except BaseException:
            connection = self._writerConnection
            if connection is None or connection.closed:
                self.reachable = False  # (not an error of the batch's)
            raise
        self.reached()
        return results

    def _writeBatch(
        self, batch: list[tuple[Operation, tuple[Any, ...]]]
    ) -> list[tuple[bool, Any]]:
        begin = _beginWrite(batch)
        connection = self._connectedWriter()
        if not _began(connection, begin):
            connection = self._connectedWriter()
            connection.execute(begin)
        raw = connection.cursor()
        cursor = TranslatingCursor(raw, keepEvents=True)

        def again() -> None:
            raw.execute("ROLLBACK")
            cursor.forgetEvents()
            raw.execute(begin)

        try:
            results = runOperations(cursor.execute, cursor, batch, again)
            assert cursor.events is not None
            if cursor.events:
                ids = self._commitWithEvents(connection, cursor.events)
                results = _withIds(results, dict(zip((i for i, _ in cursor.events), ids)))
            else:
                raw.execute(self._end())
        except BaseException:
            if not connection.closed:
                connection.rollback()
            raise
        return results

    def _commitWithEvents(
        self, connection: Any, events: list[tuple[int, list[Any]]]
    ) -> list[int]:
        """
        Insert a write's C{events} (kept aside while it ran) and commit,
        holding L{EVENTS_LOCK} from the first INSERT to the COMMIT; the
        events' ids, in order.  One round trip, unless they are large.
        """
        import psycopg

        inserts = [
            (
                f"{_EVENTS_INSERT} {', '.join(['(%s, %s, %s, %s)'] * len(chunk))} RETURNING id",
                [v for _, row in chunk for v in row],
            )
            for chunk in (
                events[start:start + _EVENTS_PER_INSERT]
                for start in range(0, len(events), _EVENTS_PER_INSERT)
            )
        ]
        size = sum(len(v) for _, params in inserts for v in params if isinstance(v, str))
        lock = f"SELECT pg_advisory_xact_lock({EVENTS_LOCK})"
        cursor = connection.cursor()
        ids: list[int] = []
        if size > _EVENTS_IN_LAST_QUERY:
            # Each INSERT in a message of its own, its values as parameters.
            cursor.execute(lock)
            for statement, params in inserts:
                cursor.execute(statement, params)
                ids.extend(row[0] for row in cursor.fetchall())
            cursor.execute(self._end(withEvents=True))
        else:
            # One simple query (several statements), so its values are
            # bound here (psycopg quotes them).  Not a pipeline: psycopg
            # polls for a pipeline's results holding the GIL.
            binder = psycopg.ClientCursor(connection)
            cursor.execute("; ".join([
                lock,
                *(binder.mogrify(statement, params) for statement, params in inserts),
                self._end(withEvents=True),
            ]))
            for _ in inserts:
                cursor.nextset()
                ids.extend(row[0] for row in cursor.fetchall())
        # One statement's rows are numbered in order, and no other write
        # numbers events while the lock is held.
        return sorted(ids)

    def _runRead(self, operation: Operation, args: tuple[Any, ...]) -> Deferred[Any]:
        return self._inThread(self._readThreads, self._readInThread, operation, args)

    @contextmanager
    def _pooled(self) -> Iterator[Any]:
        """
        A connection from the pool, waiting at most L{readWait} seconds for
        one; none at all for that long after a wait in vain.
        """
        from psycopg_pool import PoolTimeout

        if monotonic() < self._noConnectionUntil:
            raise PoolTimeout(
                f"no connection to the database: none came in {self.readWait:g} s"
                " a moment ago"
            )
        try:
            with self._pool.connection(timeout=self.readWait) as connection:
                yield connection
        except PoolTimeout:
            self.reachable = False
            self._noConnectionUntil = monotonic() + self.readWait
            raise
        self.reached()

    def reached(self) -> None:
        """
        The server took a connection or a statement: it is reachable, and
        reads need not wait to try.
        """
        self.reachable = True
        self._noConnectionUntil = 0.0

    def _readInThread(self, operation: Operation, args: tuple[Any, ...]) -> Any:
        asWorker()
        # One snapshot for all the statements of the read.
        with self._pooled() as connection:
            if _began(connection, BEGIN_READ):
                return self._readOn(connection, operation, args)
        # (The pool drops the closed one.)
        with self._pooled() as connection:
            connection.execute(BEGIN_READ)
            return self._readOn(connection, operation, args)

    def _runReadStatement(self, operation: Operation, args: tuple[Any, ...]) -> Deferred[Any]:
        return self._inThread(self._readThreads, self._readStatementInThread, operation, args)

    def _readStatementInThread(self, operation: Operation, args: tuple[Any, ...]) -> Any:
        import psycopg

        asWorker()
        with self._pooled() as connection:
            try:
                return self._statementOn(connection, operation, args)
            except psycopg.OperationalError:
                # Closed since it was last used (a restart): nothing ran,
                # and the read goes on another.
                if not connection.closed:
                    raise
        # (The pool drops the closed one.)
        with self._pooled() as connection:
            return self._statementOn(connection, operation, args)

    def _statementOn(self, connection: Any, operation: Operation, args: tuple[Any, ...]) -> Any:
        # Autocommit: the statement is a transaction of its own.
        result = operation(TranslatingCursor(connection.cursor()), *args)
        self._returned[connection] = monotonic()
        return result

    def _readOn(self, connection: Any, operation: Operation, args: tuple[Any, ...]) -> Any:
        try:
            result = operation(TranslatingCursor(connection.cursor()), *args)
        except BaseException:
            if not connection.closed:
                connection.rollback()
            raise
        # Read only, so COMMIT keeps nothing; ROLLBACK would also drop the
        # connection's prepared statements.
        connection.commit()
        self._returned[connection] = monotonic()
        return result

    def _closePools(self) -> None:
        for threads in (self._writeThreads, self._readThreads):
            if threads is not None:
                threads.stop()
        if self._pool is not None:
            self._pool.close()
        if self._writerConnection is not None:
            self._writerConnection.close()


def sessionLockKey(session: str) -> int:
    """
    The second key of C{session}'s lock (see L{SESSION_LOCKS}): the same in
    every instance.  Two sessions may share one; they then take turns.
    """
    digest = hashlib.blake2b(
        session.encode("utf-8", "surrogatepass"), digest_size=4
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


def _beginWrite(batch: Sequence[tuple[Operation, tuple[Any, ...]]]) -> str:
    """
    The start of C{batch}'s transaction (one round trip): BEGIN, and the
    lock of every session its operations change, in the order of their
    keys, so that two writes never each hold a lock the other waits for.
    """
    keys = sorted({sessionLockKey(session) for session in _sessionsOf(batch)})
    # A target list's functions run in order, left to right; a SELECT
    # takes at most 1664 of them.
    selects = [
        "SELECT " + ", ".join(
            f"pg_advisory_xact_lock({SESSION_LOCKS}, {key})"
            for key in keys[start:start + _LOCKS_PER_SELECT]
        )
        for start in range(0, len(keys), _LOCKS_PER_SELECT)
    ]
    return "; ".join([BEGIN_WRITE, *selects])


def _sessionsOf(batch: Sequence[tuple[Operation, tuple[Any, ...]]]) -> list[str]:
    names: list[str] = []
    for operation, args in batch:
        sessionsOf = SESSION_WRITES.get(operation)
        if sessionsOf is not None:
            try:
                names.extend(sessionsOf(args))
            except Exception:
                # Arguments it cannot run with: it fails alone, when it runs.
                pass
    return names


def _withIds(value: Any, ids: dict[int, int]) -> Any:
    """
    C{value} (a write's results) with each event kept aside given its id
    (C{ids}: from the one it had for now).
    """
    if isinstance(value, Event):
        return attrs.evolve(value, id=ids[value.id]) if value.id in ids else value
    if type(value) is tuple:
        return tuple(_withIds(v, ids) for v in value)
    if type(value) is list:
        return [_withIds(v, ids) for v in value]
    return value


#: Seconds within which a connection found closed at a transaction's start
#: was closed already (its server restarted since it was last used): the
#: work goes on a new one.  One that took longer to fail timed out (a
#: partition, see L{TCP_SETTINGS}): a new one would wait as long.
_FOUND_CLOSED_WITHIN = 1.0


def _began(connection: Any, begin: str) -> bool:
    """
    Run C{begin} (a transaction's start) on C{connection}; False if the
    connection turned out closed (its server went away since it was last
    used: a restart): nothing ran, and the work may go on another.
    """
    import psycopg

    started = monotonic()
    try:
        connection.execute(begin)
    except psycopg.OperationalError:
        if connection.closed:
            if monotonic() - started < _FOUND_CLOSED_WITHIN:
                return False
            raise
        connection.rollback()
        raise
    return True


#: The leases: which instance delivers to a session, until when (seconds
#: of the database's clock, so instances' clocks need not agree).
LEASE_SCHEMA: list[str | Upgrades] = [
    """
    CREATE TABLE IF NOT EXISTS leases (
        session TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        expires DOUBLE PRECISION NOT NULL
    )
    """,
]

_NOW = "EXTRACT(EPOCH FROM clock_timestamp())"


@sessionWrite(firstArgument)
def _claim(cursor: Any, session: str, owner: str, ttl: float) -> bool:
    cursor.execute(
        "INSERT INTO leases (session, owner, expires)"
        f" VALUES (?, ?, {_NOW} + ?)"
        " ON CONFLICT (session) DO UPDATE SET owner = EXCLUDED.owner,"
        " expires = EXCLUDED.expires"
        f" WHERE leases.owner = EXCLUDED.owner OR leases.expires < {_NOW}",
        (session, owner, ttl),
    )
    return cursor.rowcount == 1


def _renew(cursor: Any, sessions: list[str], owner: str, ttl: float) -> int:
    # Takes no session locks (an instance may hold thousands of leases):
    # it skips a lease another write has locked (a claim that will find it
    # held), so it never waits for a write that may wait for it.  The next
    # renewal, a third of the TTL later, renews it.
    cursor.execute(
        f"UPDATE leases SET expires = {_NOW} + ? WHERE owner = ? AND session IN"
        " (SELECT session FROM leases WHERE owner = ? AND session = ANY(?)"
        " FOR UPDATE SKIP LOCKED)",
        # (The cursor encodes parameters, not the items of a list.)
        (ttl, owner, owner, [_encode(session) for session in sessions]),
    )
    return cursor.rowcount


@sessionWrite(firstArgument)
def _release(cursor: Any, session: str, owner: str) -> None:
    cursor.execute("DELETE FROM leases WHERE session = ? AND owner = ?", (session, owner))


def _deliverableHere(cursor: Any, session: str) -> bool:
    # In a write that holds the session's lock (see SESSION_WRITES): no
    # other instance can claim the session or store a message of it until
    # this commits.
    cursor.execute(
        f"SELECT EXISTS (SELECT 1 FROM leases WHERE session = ? AND expires >= {_NOW})"
        f" OR EXISTS (SELECT 1 FROM queue WHERE session = ? AND {OPEN} AND state = ?)",
        (session, session, PENDING),
    )
    return not cursor.fetchone()[0]


def _lastEventId(cursor: Any) -> int:
    cursor.execute("SELECT COALESCE(MAX(id), 0) FROM events")
    return int(cursor.fetchone()[0])


class Leases:
    """
    Claims on sessions in the shared database: an instance delivers to a
    session only while it holds its lease, so one delivery is in flight per
    session across all instances.  A lease lasts C{ttl} seconds unless
    renewed; an instance that dies stops renewing, and another takes the
    session over once it has expired.
    """

    #: Whether a message may be delivered to C{session} in the write that
    #: stores it (a L{chatweb.store._journal.Guard}): no instance holds the
    #: session's lease and none of its messages waits, stored by any
    #: instance.  No lease is taken: the write delivers and is done.
    deliverableHere = staticmethod(_deliverableHere)

    def __init__(self, database: PostgreSQLDatabase, owner: str, ttl: float = 15.0) -> None:
        self._db = database
        self.owner = owner
        self.ttl = ttl
        #: The sessions this instance holds.
        self.held: set[str] = set()

    def claim(self, session: str) -> Deferred[bool]:
        def claimed(ok: bool) -> bool:
            if ok:
                self.held.add(session)
            return ok

        return self._db.write(_claim, session, self.owner, self.ttl).addCallback(claimed)

    def release(self, session: str) -> Deferred[None]:
        self.held.discard(session)
        return self._db.write(_release, session, self.owner)

    def renew(self) -> Deferred[int]:
        return self._db.write(_renew, sorted(self.held), self.owner, self.ttl)


#: Seconds after which events this instance committed, and announced,
#: are read back if its journal has not told of them (see
#: L{SharedEvents._committedHere}).
CHECK_AFTER = 1.0


class SharedEvents:
    """
    Publishes every event committed by any instance, in id order, to this
    instance's hub: its own (told by the journal) and the others' (told by
    LISTEN/NOTIFY), read back from the events table after the last one
    published, so none is skipped or published twice (events are committed
    in id order: see L{EVENTS_LOCK}).  One of its own that comes right
    after the last one published needs no reading back; nor does any while
    nothing in this instance subscribes to its hub (no stream is open): a
    stream opened later replays from the event log what came after the id
    it gives.
    """

    def __init__(
        self,
        database: PostgreSQLDatabase,
        reader: Callable[[int], Deferred[list[Any]]],
        publish: Callable[[Any], None],
        reactor: Any,
        onChange: Callable[[], None] = lambda: None,
        wanted: Callable[[], bool] = lambda: True,
    ) -> None:
        self._db = database
        self._read = reader
        self._publish = publish
        self._reactor = reactor
        #: Called (in the reactor thread) whenever another instance may have
        #: changed something: the queue looks again.
        self.onChange = onChange
        #: Whether anything in this instance would be given the events
        #: published (reading back another instance's events costs a round
        #: trip and their decoding).
        self.wanted = wanted
        self.lastId = 0
        self._reading = False
        self._again = False
        self._scheduled = False
        self._listening = False
        #: The last event id this instance's own commits announced, and the
        #: check that it was published (L{_committedHere}).
        self._lastHere = 0
        self._check: Any = None
        #: Reads of new events that failed in a row, and the next try.
        self._failures = 0
        self._retry: Any = None

    def start(self) -> Deferred[None]:
        """
        Publish from the newest event on; start listening.
        """

        def started(lastId: int) -> None:
            self.lastId = lastId
            self._listening = True
            self._reactor.callInThread(self._listen)

        return self._db.read(_lastEventId).addCallback(started)

    def stop(self) -> None:
        self._listening = False
        for call in (self._check, self._retry):
            if call is not None and call.active():
                call.cancel()
        self._check = self._retry = None

    def _listen(self) -> None:
        # A thread of its own, with a connection of its own.
        import time

        while self._listening:
            try:
                connection = self._db.connect()
            except Exception:
                time.sleep(1)
                continue
            try:
                connection.execute(f"LISTEN {CHANNEL}")
                self._db.reached()
                # Whatever was committed while not listening.
                self._reactor.callFromThread(self.changed)
                self._reactor.callFromThread(self.onChange)
                while self._listening:
                    for notice in connection.notifies(timeout=0.5, stop_after=1):
                        instance, _, lastEvent = notice.payload.partition(" ")
                        if instance != self._db.instance:
                            if lastEvent:
                                # (A write that recorded no event adds none.)
                                self._reactor.callFromThread(
                                    self._newUpTo, int(lastEvent)
                                )
                            self._reactor.callFromThread(self.onChange)
                        elif lastEvent:
                            # Its own commits are told by its journal (and
                            # free no other's lease).
                            self._reactor.callFromThread(self._committedHere, int(lastEvent))
            except Exception:
                time.sleep(0.2)
            finally:
                connection.close()

    def _newUpTo(self, lastEvent: int) -> None:
        """
        Events up to C{lastEvent} are committed: read those not yet
        published, if anything here wants them.
        """
        if lastEvent <= self.lastId:
            return  # read (or skipped) already
        if self.wanted():
            self.changed()
        else:
            # Events are committed in id order: every event up to it is in
            # the log, where a stream opened from now on replays it.
            self.lastId = lastEvent

    def _committedHere(self, lastEvent: int) -> None:
        """
        This instance committed events up to C{lastEvent} (its NOTIFY
        said).  Its journal tells of them, unless the write's caller went
        away meanwhile (a delivery cancelled while its record was
        written): so, once L{CHECK_AFTER} has passed, they are read if
        still not published.
        """
        self._lastHere = max(self._lastHere, lastEvent)
        if self._check is None and self._lastHere > self.lastId:
            self._check = self._reactor.callLater(CHECK_AFTER, self._checkHere)

    def _checkHere(self) -> None:
        self._check = None
        if self._lastHere > self.lastId:
            self._newUpTo(self._lastHere)

    def changed(self, event: Event | None = None) -> None:
        """
        Something was committed (by this instance: C{event}, told by its
        journal): publish what is new.  An event of this instance's that
        comes right after the last one published is published as it is;
        otherwise what is new is read (once the reactor is done with the
        write that called: the journal calls once for each of a write's
        events).
        """
        if not self._listening:
            return  # stopped (or not started): the database may be closed
        if event is not None:
            if event.id <= self.lastId:
                return  # read and published already
            if not self.wanted():
                self.lastId = event.id  # (as in _newUpTo)
                self._publish(event)  # (to no one, but it is the newest)
                return
            if event.id == self.lastId + 1 and not (self._reading or self._scheduled):
                # Event ids are given in commit order (EVENTS_LOCK): nothing
                # committed by another instance can come before it.
                self.lastId = event.id
                self._publish(event)
                return
        if self._reading:
            self._again = True
            return
        if not self._scheduled:
            self._scheduled = True
            self._reactor.callLater(0, self._readNew)

    def _readNew(self) -> None:
        self._scheduled = False
        if not self._listening:
            return
        self._reading = True
        self._again = False

        def got(events: list[Any]) -> None:
            self._failures = 0
            for event in events:
                if event.id > self.lastId:
                    self.lastId = event.id
                    self._publish(event)
            if len(events) >= 1000:
                self._again = True

        def done(_: object) -> None:
            self._reading = False
            if self._again:
                self.changed()

        def failed(failure: Failure) -> None:
            logFailure(_log, failure, "Could not read the new events")
            # Nothing else may come to make it read again: it tries again
            # later, less often while it keeps failing.
            self._failures += 1
            if self._retry is None or not self._retry.active():
                delay = min(RETRY_LONGEST, 0.5 * 2 ** (self._failures - 1))
                self._retry = self._reactor.callLater(delay, self.changed)

        self._read(self.lastId).addCallback(got).addErrback(failed).addBoth(done)
