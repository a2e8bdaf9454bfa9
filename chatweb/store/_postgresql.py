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

Every write transaction first takes one transaction-scoped advisory lock,
so writes from all instances commit one at a time, in id order: a reader
that has seen event (or message) id N never later finds a smaller id
committed (the event streams and the queue rely on that).  Writes still go
in groups (one transaction, one fsync for many), as on SQLite.
"""

from __future__ import annotations

import functools
import re
import uuid
import weakref
from collections.abc import Callable, Sequence
from time import monotonic
from typing import Any, Union
from urllib.parse import urlsplit, urlunsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from chatweb._priority import asWorker
from chatweb.model import PENDING
from chatweb.store._journal import OPEN
from chatweb.store._sqlite import (
    SQLiteDatabase,
    Upgrades,
    applySchema,
    applyUpgrades,
    runOperations,
)

_log = Logger()

Operation = Callable[..., Any]

#: pg_advisory_lock keys: the schema (held while it is made or upgraded, so
#: instances starting at once take turns) and the writes.
SCHEMA_LOCK = 0x63687765_0001
WRITE_LOCK = 0x63687765_0002

#: Seconds a pooled connection may sit idle and still be used without a
#: check (a round trip) first: one just used is alive, or it fails at the
#: read's start and the read goes on another (L{_began}); one idle longer
#: may have lost its server meanwhile (a restart, an idle timeout), as may
#: the others in the pool, and is replaced before it is used.
IDLE_CHECK = 1.0

#: How write and read transactions begin.  Writes read what others
#: committed up to each statement (READ COMMITTED, whatever the server's
#: default): taken before the write lock is granted, a snapshot would miss
#: what the lock's last holder committed (see L{_deliverableHere}).
BEGIN_WRITE = "BEGIN ISOLATION LEVEL READ COMMITTED"
BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

#: A write transaction's start, in one round trip (several statements and
#: no parameters: sent as one simple query); its end likewise (L{_end}).
_BEGIN_AND_LOCK = f"{BEGIN_WRITE}; SELECT pg_advisory_xact_lock({WRITE_LOCK})"

#: Where committed changes are announced (LISTEN/NOTIFY).
CHANNEL = "chatweb_events"

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
    """

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self.lastrowid: int | None = None
        #: The keys of every row the last INSERT added, or None.
        self.insertedIds: list[int] | None = None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> "TranslatingCursor":
        statement, key = translate(sql)
        self._cursor.execute(statement, [_encode(p) for p in params])
        self.lastrowid = self.insertedIds = None
        if key is not None:
            self.insertedIds = [row[0] for row in self._cursor.fetchall()]
            # As sqlite3's: the last row's.
            self.lastrowid = self.insertedIds[-1] if self.insertedIds else None
        return self

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
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
        from psycopg.conninfo import conninfo_to_dict

        kwargs: dict[str, Any] = {"autocommit": True}
        if self._password is not None:
            kwargs["password"] = self._password
        if "connect_timeout" not in conninfo_to_dict(self._dsn):
            # Not libpq's default (none; psycopg's 130 s): a writer that
            # reconnects to an unreachable server holds every write.
            kwargs["connect_timeout"] = max(1, int(self._connectTimeout))
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

    def _end(self) -> str:
        if not self.notify:
            return "COMMIT"
        # Delivered to listeners when (and only if) this commits.  Both
        # values are chatweb's own (a constant, a hex uuid): no quoting.
        return f"SELECT pg_notify('{CHANNEL}', '{self.instance}'); COMMIT"

    def _batchInThread(
        self, batch: list[tuple[Operation, tuple[Any, ...]]]
    ) -> list[tuple[bool, Any]]:
        connection = self._connectedWriter()
        if not _began(connection, _BEGIN_AND_LOCK):
            connection = self._connectedWriter()
            connection.execute(_BEGIN_AND_LOCK)
        raw = connection.cursor()
        cursor = TranslatingCursor(raw)

        def again() -> None:
            raw.execute("ROLLBACK")
            raw.execute(_BEGIN_AND_LOCK)

        try:
            results = runOperations(raw.execute, cursor, batch, again)
            raw.execute(self._end())
        except BaseException:
            if not connection.closed:
                connection.rollback()
            raise
        return results

    def _runRead(self, operation: Operation, args: tuple[Any, ...]) -> Deferred[Any]:
        return self._inThread(self._readThreads, self._readInThread, operation, args)

    def _readInThread(self, operation: Operation, args: tuple[Any, ...]) -> Any:
        asWorker()
        # One snapshot for all the statements of the read.
        with self._pool.connection() as connection:
            if _began(connection, BEGIN_READ):
                return self._readOn(connection, operation, args)
        # (The pool drops the closed one.)
        with self._pool.connection() as connection:
            connection.execute(BEGIN_READ)
            return self._readOn(connection, operation, args)

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


def _began(connection: Any, begin: str) -> bool:
    """
    Run C{begin} (a transaction's start) on C{connection}; False if the
    connection turned out closed (its server went away since it was last
    used: a restart): nothing ran, and the work may go on another.
    """
    import psycopg

    try:
        connection.execute(begin)
    except psycopg.OperationalError:
        if connection.closed:
            return False
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
    renewed = 0
    for session in sessions:
        cursor.execute(
            f"UPDATE leases SET expires = {_NOW} + ? WHERE session = ? AND owner = ?",
            (ttl, session, owner),
        )
        renewed += cursor.rowcount
    return renewed


def _release(cursor: Any, session: str, owner: str) -> None:
    cursor.execute("DELETE FROM leases WHERE session = ? AND owner = ?", (session, owner))


def _deliverableHere(cursor: Any, session: str) -> bool:
    # In a write, so under WRITE_LOCK: no other instance can claim the
    # session or store a message of it until this commits.
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


class SharedEvents:
    """
    Publishes every event committed by any instance, in id order, to this
    instance's hub: its own (told by the journal) and the others' (told by
    LISTEN/NOTIFY), each read back from the events table, so none is
    skipped or published twice (writes commit in id order: see
    L{WRITE_LOCK}).
    """

    def __init__(
        self,
        database: PostgreSQLDatabase,
        reader: Callable[[int], Deferred[list[Any]]],
        publish: Callable[[Any], None],
        reactor: Any,
        onChange: Callable[[], None] = lambda: None,
    ) -> None:
        self._db = database
        self._read = reader
        self._publish = publish
        self._reactor = reactor
        #: Called (in the reactor thread) whenever another instance may have
        #: changed something: the queue looks again.
        self.onChange = onChange
        self.lastId = 0
        self._reading = False
        self._again = False
        self._listening = False

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
                # Whatever was committed while not listening.
                self._reactor.callFromThread(self.changed)
                self._reactor.callFromThread(self.onChange)
                while self._listening:
                    for notice in connection.notifies(timeout=0.5, stop_after=1):
                        self._reactor.callFromThread(self.changed)
                        # This instance's own commits free no other's lease.
                        if notice.payload != self._db.instance:
                            self._reactor.callFromThread(self.onChange)
            except Exception:
                time.sleep(0.2)
            finally:
                connection.close()

    def changed(self, _: object = None) -> None:
        """
        Something was committed: publish what is new.
        """
        if not self._listening:
            return  # stopped (or not started): the database may be closed
        if self._reading:
            self._again = True
            return
        self._reading = True
        self._again = False

        def got(events: list[Any]) -> None:
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

        self._read(self.lastId).addCallback(got).addErrback(
            lambda f: _log.failure("Could not read the new events", f)
        ).addBoth(done)
