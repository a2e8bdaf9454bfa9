"""
The PostgreSQL engine on a real server (see L{tests.postgres}): the local
backend's session storage, the schema made by instances starting at once,
the password never shown, and the service wired to it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from chatweb.backends.local import SCHEMA as SESSIONS_SCHEMA
from chatweb.backends.local import LocalBackend
from chatweb.backends.responders import EchoResponder
from chatweb.interfaces import IResponder
from chatweb.model import DELIVERED, PENDING, Delivery, Event, EventKind, Message, Session
from chatweb.store._journal import SCHEMA as JOURNAL_SCHEMA
from chatweb.store._journal import SQLiteJournal, _queued
from chatweb.store._postgresql import (
    CHANNEL,
    LEASE_SCHEMA,
    Leases,
    PostgreSQLDatabase,
    SharedEvents,
    redact,
    translate,
)
from chatweb.store._sqlite import firstArgument, sessionWrite
from chatweb.tap import Options

from . import test_recorded, test_sessionapi, test_storage
from .postgres import PASSWORD, USER, cluster, freshDatabase

SCHEMA = JOURNAL_SCHEMA + SESSIONS_SCHEMA


class PostgreSQLStorageMixin:
    """
    Runs a L{test_storage} TestCase on a fresh PostgreSQL database.
    """

    def setUp(self) -> Any:
        self.dsn = freshDatabase(self)
        self.db = self.openDatabase()
        return self.db.open(SCHEMA)

    def openDatabase(self) -> Any:
        db = PostgreSQLDatabase(self.dsn, reactor)
        self.addCleanup(db.close)  # type: ignore[attr-defined]
        return db

    def writeElsewhere(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn) as other:
            other.execute(statement)


class PostgreSQLJournalTests(PostgreSQLStorageMixin, test_storage.JournalTests):
    async def test_appendIsDurable(self) -> None:  # type: ignore[override]
        """
        An appended message is there for another connection once its
        append has fired.
        """
        import psycopg

        journal = SQLiteJournal(self.db)
        first = await journal.append("ci", "one", 1.0)
        await journal.append("ci", "two", 2.0)
        with psycopg.connect(self.dsn) as other:
            rows = other.execute("SELECT content FROM queue ORDER BY id").fetchall()
        self.assertEqual(rows, [("one",), ("two",)])
        await journal.markDelivered(first.id)
        self.assertEqual([m.content for m in await journal.pending()], ["two"])


class PostgreSQLLocalBackendTests(PostgreSQLStorageMixin, test_storage.LocalBackendTests):
    pass


class PostgreSQLRecordedTests(test_recorded.RecordedTests):
    """
    A message stored and delivered in one write, on PostgreSQL: the same
    order, events (their ids as committed) and atomicity.
    """

    schema = SCHEMA + LEASE_SCHEMA

    def makeDatabase(self) -> Any:
        return PostgreSQLDatabase(freshDatabase(self), reactor)

    def postGuarded(self, content: str, key: str | None = None) -> Deferred[Any]:
        """
        What an instance among others does: the write asks the leases'
        guard first.
        """
        backend = LocalBackend(self.db, reactor, eventSink=self.hub.publish)
        return self.journal.appendRecorded(
            "s", content, reactor.seconds(), key, backend.recorder(), Leases.deliverableHere
        )

    async def test_guardedWhileAnotherInstanceHoldsTheLease(self) -> None:
        await self.db.write(lambda cursor: cursor.execute(
            "INSERT INTO leases (session, owner, expires) VALUES ('s', 'other', 1e12)"))
        held = await self.postGuarded("held")
        self.assertEqual(held.state, PENDING)
        await self.db.write(lambda cursor: cursor.execute("DELETE FROM leases"))
        # Behind the one that waits.
        self.assertEqual((await self.postGuarded("behind")).state, PENDING)
        for message in await self.journal.messages("s"):
            await self.journal.markDelivered(message.id)
        self.assertEqual((await self.postGuarded("free")).state, DELIVERED)

    async def test_guardedBehindAMessageInTheSameWrite(self) -> None:
        """
        Two posts in one write, the first refused (a message of the session
        waits): the second sees the first waiting, and waits too; a
        repeated Idempotency-Key among them is stored once.
        """
        waiting = await self.journal.append("s", "waiting", reactor.seconds())
        gate = self.holdWriter()
        posts = [self.postGuarded("one", "k1"), self.postGuarded("two"),
                 self.postGuarded("one", "k1")]
        gate.set()
        one, two, again = await gatherResults(posts)
        self.assertEqual((one.state, two.state), (PENDING, PENDING))
        self.assertEqual((again.id, again.duplicate), (one.id, True))
        self.assertEqual([m.id for m in await self.journal.messages("s")],
                         [waiting.id, one.id, two.id])

    async def test_aFailedMessageDoesNotHoldTheSession(self) -> None:
        """
        A message that failed for good (listed, to be retried by hand)
        does not wait in line: the next is delivered in the write that
        stores it, as with one instance.
        """
        failed = await self.journal.append("s", "failed", reactor.seconds())
        await self.journal.recordFailure(failed.id, "boom", True)
        self.assertEqual((await self.postGuarded("next")).state, DELIVERED)


class NoFileTests(TestCase):
    async def test_noFileNamedAfterTheDSN(self) -> None:
        """
        Opening a PostgreSQL store makes no file or directory in the
        working directory (SQLite's store makes its database file first).
        """
        dsn = freshDatabase(self)
        here = os.path.abspath(self.mktemp())
        os.makedirs(here)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(here)
        db = PostgreSQLDatabase(dsn, reactor)
        await db.open(JOURNAL_SCHEMA)
        await db.close()
        self.assertEqual(os.listdir(here), [])


class PostgreSQLDatabaseTests(PostgreSQLStorageMixin, TestCase):
    # The engine-neutral ones of test_storage.DatabaseTests.
    test_failingWriteDoesNotUndoItsGroup = (
        test_storage.DatabaseTests.test_failingWriteDoesNotUndoItsGroup
    )
    test_aRefusalDoesNotRunItsGroupAgain = (
        test_storage.DatabaseTests.test_aRefusalDoesNotRunItsGroupAgain
    )
    test_neverOnTheReactorThread = test_storage.DatabaseTests.test_neverOnTheReactorThread
    test_closedWithoutOpening = test_storage.DatabaseTests.test_closedWithoutOpening


def _waitUntil(condition: Any, timeout: float = 10.0) -> None:
    """
    Wait (in a thread) until C{condition()} holds.
    """
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def _preparedStatements(cursor: Any) -> int:
    # pg_prepared_statements lists the statements of this connection only.
    cursor.execute("SELECT COUNT(*) FROM pg_prepared_statements")
    return int(cursor.fetchone()[0])


async def oneSessionWaits(dsn: str, waitEvent: str) -> None:
    """
    Until one database session waits for C{waitEvent} (C{advisory}, a
    row's C{transactionid}), or a few seconds have passed.
    """
    import psycopg

    def waiting() -> bool:
        with psycopg.connect(dsn, autocommit=True) as admin:
            row = admin.execute(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event = %s", (waitEvent,)
            ).fetchone()
        return row is not None and row[0] == 1

    for _ in range(200):
        if await deferToThread(waiting):
            return


def takeConnections(dsn: str, allowed: bool) -> None:
    """
    Make the database of C{dsn} refuse new connections, as a server that
    is down does, ending those it has; or take them again.
    """
    import psycopg

    with psycopg.connect(cluster().dsn(), autocommit=True) as admin:
        name = admin.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'test_%%'"
            " AND %s LIKE '%%/' || datname || '?%%'", (dsn,)
        ).fetchone()[0]
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {allowed}')
        if not allowed:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s", (name,)
            )
            _waitUntil(lambda: admin.execute(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s", (name,)
            ).fetchone() == (0,))


class ConnectionTests(PostgreSQLStorageMixin, TestCase):
    """
    How the engine uses its connections: the statements it runs again and
    again stay prepared (parsed and planned once), and a connection that
    lost its server while idle is replaced before it is used.
    """

    def openDatabase(self) -> Any:
        # One reader: every read uses the one pooled connection.
        db = PostgreSQLDatabase(self.dsn, reactor, readers=1)
        self.addCleanup(db.close)
        return db

    async def test_statementsStayPrepared(self) -> None:
        """
        After reads and writes of the same statements, both the reader's
        and the writer's connections hold them prepared: a read's end
        (its read-only transaction) does not drop them.
        """
        journal = SQLiteJournal(self.db)
        for n in range(8):
            message = await journal.append("s", f"m{n}", float(n))
            await journal.nextPending("s")
            await journal.markDelivered(message.id)
        self.assertGreaterEqual(await self.db.read(_preparedStatements), 2)
        self.assertGreaterEqual(await self.db.write(_preparedStatements), 2)

    def _terminateOthers(self) -> int:
        """
        End every other session of the test's database, as a server restart
        or an idle timeout would, and wait until they are gone.
        """
        import time

        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
            for _ in range(200):
                left = admin.execute(
                    "SELECT COUNT(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()
                if left is not None and left[0] == 0:
                    break
                time.sleep(0.01)
        return len(ended)

    async def test_connectionsLostWhileIdleReplaced(self) -> None:
        """
        Once the server has ended chatweb's sessions (a restart, an idle
        timeout), the next write and read still succeed, even with every
        pooled connection lost: a pooled connection idle longer than
        C{idleCheck} is checked first, and replaced.
        """
        import threading

        db = PostgreSQLDatabase(self.dsn, reactor, readers=2)
        self.addCleanup(db.close)
        await db.open(SCHEMA)
        journal = SQLiteJournal(db)
        first = await journal.append("s", "before", 1.0)
        # Two reads at once: the pool holds two connections.
        gate = threading.Event()
        self.addCleanup(gate.set)
        held = [db.read(lambda cursor: gate.wait(10)) for _ in range(2)]
        await deferToThread(lambda: _waitUntil(lambda: db._pool.get_stats()["pool_size"] == 2))
        gate.set()
        await gatherResults(held)
        db.idleCheck = 0.0
        self.assertGreaterEqual(self._terminateOthers(), 3)
        second = await journal.append("s", "after", 2.0)
        self.assertEqual(await journal.pending(), [first, second])

    async def test_brokenConnectionsReplaced(self) -> None:
        """
        A connection found broken only when used (no check: it was used
        just before) fails at the transaction's start, before anything ran:
        the write or read goes on a new connection, and succeeds.
        """
        journal = SQLiteJournal(self.db)
        first = await journal.append("s", "before", 1.0)
        self.assertEqual(await journal.pending(), [first])
        self.db.idleCheck = 3600.0
        self._terminateOthers()
        second = await journal.append("s", "after", 2.0)
        self._terminateOthers()
        self.assertEqual(await journal.pending(), [first, second])
        # Reads of one statement (no transaction) likewise.
        self._terminateOthers()
        self.assertEqual(len(await journal.eventsSince(0)), 2)

    async def test_sessionsSayWhoseTheyAre(self) -> None:
        """
        In pg_stat_activity, chatweb's sessions are named for the host and
        process of the instance.
        """
        import socket

        def mine(cursor: Any) -> Any:
            return cursor.execute(
                "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            ).fetchone()[0]

        expected = f"chatweb {socket.gethostname()}:{os.getpid()}"[:60]
        self.assertEqual(await self.db.read(mine), expected)
        self.assertEqual(await self.db.write(mine), expected)

    async def test_readsFailSoonWithoutTheServer(self) -> None:
        """
        While the server takes no connection, a read fails once it has
        waited C{readWait} seconds for one (not the connect timeout), and
        for as long after, reads fail without waiting; once the server
        takes connections again, reads succeed.  The database says whether
        it was reached.
        """
        from psycopg_pool import PoolTimeout

        journal = SQLiteJournal(self.db)
        self.assertEqual(await journal.pending(), [])
        self.db.readWait, self.db.idleCheck = 0.5, 0.0
        self.addCleanup(takeConnections, self.dsn, True)
        takeConnections(self.dsn, False)
        waited: list[object] = []
        connection = self.db._pool.connection
        self.patch(self.db._pool, "connection",
                   lambda **kwargs: waited.append(kwargs) or connection(**kwargs))
        with self.assertRaises(PoolTimeout):
            await journal.pending()
        self.assertEqual(waited, [{"timeout": 0.5}])
        self.assertFalse(self.db.reachable)  # (what GET /healthz says)
        with self.assertRaises(PoolTimeout):
            await journal.pending()
        with self.assertRaises(PoolTimeout):
            await journal.eventsSince(0)
        self.assertEqual(len(waited), 1)
        takeConnections(self.dsn, True)
        self.db.readWait = 30.0
        await deferLater(reactor, 0.5)
        self.assertEqual(await journal.pending(), [])
        self.assertTrue(self.db.reachable)

    async def test_writesSeeWhatTheLockHolderCommitted(self) -> None:
        """
        With the server's default isolation REPEATABLE READ, a write that
        waited for a session's lock still sees what the lock's holder
        committed: a message stored while it waited is not overtaken.
        """
        import threading

        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as admin:
            admin.execute(
                f'ALTER DATABASE "{admin.info.dbname}"'
                " SET default_transaction_isolation = 'repeatable read'"
            )
        # Two instances' databases, connected after the change.
        other, mine = PostgreSQLDatabase(self.dsn, reactor), PostgreSQLDatabase(self.dsn, reactor)
        for db in (other, mine):
            self.addCleanup(db.close)
            await db.open(SCHEMA + LEASE_SCHEMA)
        entered, gate = threading.Event(), threading.Event()

        @sessionWrite(firstArgument)
        def storeAndHold(cursor: Any, session: str) -> None:
            _queued(cursor, session, "first", 1.0, None)
            entered.set()
            gate.wait(10)

        held = other.write(storeAndHold, "s")
        self.addCleanup(gate.set)
        await deferToThread(entered.wait, 10)
        backend = LocalBackend(mine, reactor)
        second = SQLiteJournal(mine).appendRecorded(
            "s", "second", 2.0, None, backend.recorder(), Leases.deliverableHere
        )

        await oneSessionWaits(self.dsn, "advisory")
        gate.set()
        await held
        self.assertEqual((await second).state, PENDING)


class ConcurrentWritesTests(PostgreSQLStorageMixin, TestCase):
    """
    Instances write at once: a write waits only for those that change the
    same sessions, and events are numbered in the order they commit.
    """

    async def otherInstance(self) -> PostgreSQLDatabase:
        """
        Another instance's database (with the leases' table).
        """
        other = PostgreSQLDatabase(self.dsn, reactor)
        self.addCleanup(other.close)
        await other.open(SCHEMA + LEASE_SCHEMA)
        return other

    async def holdWrite(self, operation: Any, *args: Any) -> tuple[Any, Deferred[Any]]:
        """
        Another instance's write of C{operation(cursor, *args)}, which then
        waits, in its transaction, until the returned gate is set.
        """
        import threading

        from chatweb.store._sqlite import SESSION_WRITES

        other = await self.otherInstance()
        entered, gate = threading.Event(), threading.Event()
        self.addCleanup(gate.set)

        def hold(cursor: Any, *args: Any) -> Any:
            result = operation(cursor, *args)
            entered.set()
            gate.wait(10)
            return result

        if operation in SESSION_WRITES:
            sessionWrite(SESSION_WRITES[operation])(hold)
        held = other.write(hold, *args)
        await deferToThread(entered.wait, 10)
        return gate, held

    def holdWriteTo(self, session: str) -> Deferred[tuple[Any, Deferred[Any]]]:
        """
        L{holdWrite} of a message stored for C{session}.
        """
        return Deferred.fromCoroutine(self.holdWrite(_queued, session, "held", 1.0, None))

    async def test_otherSessionsWrittenMeanwhile(self) -> None:
        """
        While one instance's write to a session is under way, another
        instance's write to another session commits.
        """
        gate, held = await self.holdWriteTo("a")
        journal = SQLiteJournal(self.db)
        stored = await journal.append("b", "meanwhile", 2.0).addTimeout(5, reactor)
        self.assertEqual(await journal.pending(), [stored])
        gate.set()
        await held

    async def test_aSessionWrittenOneWriteAtATime(self) -> None:
        """
        Another instance's write to the same session waits for the one
        under way: a session's messages are stored in the order they
        commit.
        """
        gate, held = await self.holdWriteTo("a")
        journal = SQLiteJournal(self.db)
        behind = journal.append("a", "behind", 2.0)
        await oneSessionWaits(self.dsn, "advisory")
        self.assertFalse(behind.called)
        gate.set()
        first, second = (await held)[0], await behind
        self.assertEqual([m.id for m in await journal.pending()], [first.id, second.id])

    async def test_oneIdempotencyKeyAcrossInstances(self) -> None:
        """
        Two instances storing messages with the same idempotency key for
        different sessions at once: the second waits for the first, and
        is refused as a conflict.
        """
        from chatweb.errors import IdempotencyConflict

        gate, held = await self.holdWrite(_queued, "a", "first", 1.0, "key-1")
        journal = SQLiteJournal(self.db)
        second = journal.append("b", "second", 2.0, "key-1")
        await oneSessionWaits(self.dsn, "advisory")
        self.assertFalse(second.called)
        gate.set()
        first = (await held)[0]
        with self.assertRaises(IdempotencyConflict):
            await second
        self.assertEqual(await journal.pending(), [first])

    async def test_discardAfterAnotherInstanceDelivered(self) -> None:
        """
        A message discarded through one instance while another records
        its delivery: once that commits, the discard is refused (the
        message was delivered), and the message stays delivered.
        """
        from chatweb.errors import WrongState
        from chatweb.store._journal import _markDelivered

        journal = SQLiteJournal(self.db)
        message = await journal.append("s", "hello", 1.0)
        gate, held = await self.holdWrite(_markDelivered, message.id, 2.0)
        discard = journal.discard(message.id)
        await oneSessionWaits(self.dsn, "transactionid")
        gate.set()
        await held
        with self.assertRaises(WrongState):
            await discard
        self.assertEqual((await journal.messageHistory(message.id))[0].state, DELIVERED)

    async def test_eventsNumberedInCommitOrder(self) -> None:
        """
        A write that commits later has the larger event ids, whenever its
        operations ran: a reader that saw event N finds no smaller id
        committed afterwards.
        """
        gate, held = await self.holdWriteTo("a")
        journal = SQLiteJournal(self.db)
        early = await journal.append("b", "commits first", 2.0).addTimeout(5, reactor)
        seen = await journal.eventsSince(0)
        gate.set()
        late = (await held)[0]
        events = await journal.eventsSince(0)
        self.assertEqual([(e.session, e.data["message"]) for e in events],
                         [("b", early.id), ("a", late.id)])
        self.assertEqual(seen, events[:1])

    async def test_eventsOfAnUndoneOperationDropped(self) -> None:
        """
        When one operation of a group fails after recording an event, the
        others' events are committed with their ids and its are not.
        """

        def failsAfterAnEvent(cursor: Any) -> None:
            _queued(cursor, "failing", "undone", 1.0, None)
            raise RuntimeError("fails after writing")

        results = await self.db._runBatch([
            (_queued, ("s", "first", 1.0, None)),
            (failsAfterAnEvent, ()),
            (_queued, ("s", "second", 2.0, None)),
        ])
        self.assertEqual([ok for ok, _ in results], [True, False, True])
        (first, [firstEvent]), (second, [secondEvent]) = results[0][1], results[2][1]
        events = await SQLiteJournal(self.db).eventsSince(0)
        self.assertEqual(
            [(e.id, e.data["message"]) for e in events],
            [(firstEvent.id, first.id), (secondEvent.id, second.id)],
        )

    async def test_manyEventsInOneWrite(self) -> None:
        """
        A write that records thousands of events commits them all, and
        its caller gets each with the id the event log gives it.
        """
        from chatweb.model import EventKind
        from chatweb.store._journal import insertEvents

        def recordMany(cursor: Any) -> Any:
            return insertEvents(cursor, [
                (EventKind.DELIVERY_TEXT, "s", 1.0, {"text": f"part {n}"}) for n in range(2500)
            ])

        returned = await self.db.write(recordMany)
        logged = await SQLiteJournal(self.db).eventsSince(0, limit=5000)
        self.assertEqual(len(logged), 2500)
        # (Not assertEqual: its diff of 2,500 events takes minutes.)
        wrong = [(r.id, l.id) for r, l in zip(returned, logged) if r != l]
        self.assertEqual((len(returned), wrong[:3]), (2500, []))

    def test_everyWriteToASessionLocksIt(self) -> None:
        """
        Every write that adds to a session (its queue, its messages) or
        changes its record or its lease takes that session's lock (and only
        its); a change of one message's state is guarded by its row.
        """
        from chatweb.backends import local
        from chatweb.store import _journal, _postgresql
        from chatweb.store._postgresql import _beginWrite, sessionLockKey

        delivery = Delivery(1, "s", "hello", 1.0)
        writes = [
            (_journal._queued, ("s", "x", 1.0, None)),
            (_journal._queuedAndRecorded, ("s", "x", 1.0, None, lambda *a: [], None)),
            (local._recordDelivery, (delivery, 1.0, True)),
            (local._appendReplies, ("s", 1, [], 1.0, True)),
            (local._deleteSession, ("s", 1.0, True)),
            (local._clearSession, ("s", 1.0, True)),
            (local._deleteMessage, ("s", 0, 1.0, True)),
            (local._updateSession, ("s", "model", "m", 1.0, True)),
            (local._withEvent, (local._importSession, True, None, Session("s"), False, 1.0)),
            (_postgresql._claim, ("s", "me", 15.0)),
            (_postgresql._release, ("s", "me")),
        ]
        lock = f"pg_advisory_xact_lock({_postgresql.SESSION_LOCKS}, {sessionLockKey('s')})"
        for operation, args in writes:
            self.assertTrue(_beginWrite([(operation, args)]).endswith(f"SELECT {lock}"),
                            operation.__name__)
        self.assertNotIn("pg_advisory", _beginWrite([(_journal._markDelivered, (1, 1.0))]))

    async def test_largeEventsInOneWrite(self) -> None:
        """
        A write whose events are larger than one query should carry
        commits them all, with their ids.
        """
        from chatweb.model import EventKind
        from chatweb.store._journal import insertEvents

        def recordLarge(cursor: Any) -> Any:
            return insertEvents(cursor, [
                (EventKind.DELIVERY_TEXT, "s", 1.0, {"text": f"{n}" + "\u00e9" * 1_000_000})
                for n in range(6)
            ])

        returned = await self.db.write(recordLarge)
        logged = await SQLiteJournal(self.db).eventsSince(0)
        self.assertEqual([e.data["text"][0] for e in logged], list("012345"))
        self.assertEqual([e.id for e in returned], [e.id for e in logged])

    async def test_aWriteToThousandsOfSessions(self) -> None:
        """
        A group of writes to 2,000 sessions (more locks than one SELECT
        may take) commits.
        """
        results = await self.db._runBatch(
            [(_queued, (f"s{n}", "x", 1.0, None)) for n in range(2000)]
        )
        self.assertEqual({ok for ok, _ in results}, {True})
        self.assertEqual(len(await SQLiteJournal(self.db).pending()), 2000)

    async def test_leasesRenewedWithoutWaiting(self) -> None:
        """
        An instance's renewal extends each of its leases (whatever the
        session's id) but one another write has locked: it does not wait
        for that write, which may be waiting for it.
        """
        await self.otherInstance()  # (which makes the leases' table)
        mine = Leases(self.db, "me", ttl=60.0)
        for session in ["a", "b\x00nul", "c"]:
            self.assertTrue(await mine.claim(session))

        def lockLease(cursor: Any, session: str) -> None:
            cursor.execute("SELECT 1 FROM leases WHERE session = ? FOR UPDATE", (session,))

        gate, held = await self.holdWrite(lockLease, "c")
        mine.ttl = 3600.0
        self.assertEqual(await mine.renew().addTimeout(5, reactor), 2)
        gate.set()
        await held

        def expiries(cursor: Any) -> Any:
            cursor.execute(
                "SELECT session, expires - EXTRACT(EPOCH FROM clock_timestamp())"
                " FROM leases ORDER BY session"
            )
            return [(session, left > 600) for session, left in cursor.fetchall()]

        self.assertEqual(await self.db.read(expiries),
                         [("a", True), ("b\x00nul", True), ("c", False)])

    def test_eventsRecordedOnlyAsTheJournalDoes(self) -> None:
        """
        A write's cursor refuses any other statement into the event log
        (its rows would be numbered outside the commit order), and runs
        nothing for the journal's.
        """
        from chatweb.store._postgresql import TranslatingCursor

        ran: list[str] = []

        class Raw:
            def execute(self, sql: str, params: Any) -> None:
                ran.append(sql)

            def executemany(self, sql: str, rows: Any) -> None:
                ran.append(sql)

        cursor = TranslatingCursor(Raw(), keepEvents=True)
        cursor.execute("INSERT INTO events (kind, session, time, data) VALUES (?, ?, ?, ?)",
                       ("message.queued", "s", 1.0, "{}"))
        for statement in ["INSERT OR IGNORE INTO events (id, kind) VALUES (?, ?)",
                          "insert into events (kind) values (?)"]:
            with self.assertRaises(ValueError):
                cursor.execute(statement, (1, "k"))
        with self.assertRaises(ValueError):
            cursor.executemany("INSERT INTO events (kind, session, time, data) VALUES"
                               " (?, ?, ?, ?)", [])
        self.assertEqual((ran, len(cursor.events or [])), ([], 1))

    def test_sessionLocksTakenInOneOrder(self) -> None:
        """
        A write locks its sessions in the order of their keys, whatever
        the order of its operations: two writes never each hold a lock the
        other waits for.
        """
        from chatweb.store._postgresql import _beginWrite, sessionLockKey

        forward = _beginWrite([(_queued, (s, "x", 1.0, None)) for s in "abcdef"])
        backward = _beginWrite([(_queued, (s, "x", 1.0, None)) for s in "fedcba"])
        self.assertEqual(forward, backward)
        keys = [int(k) for k in re.findall(r"pg_advisory_xact_lock\(\d+, (-?\d+)\)", forward)]
        self.assertEqual(keys, sorted(sessionLockKey(s) for s in "abcdef"))


class PostgreSQLCollationTests(PostgreSQLStorageMixin, TestCase):
    async def test_sessionsListedInCodePointOrder(self) -> None:
        """
        Sessions are listed as SQLite lists them (by code point), whatever
        the database's locale: its text columns use the "C" collation.
        """
        import psycopg

        backend = LocalBackend(self.db, reactor)
        for n, sessionId in enumerate(["b", "C", "a", "B"]):
            await backend.deliver(Delivery(n + 1, sessionId, "x", 1700000000.0))
        self.assertEqual(await backend.listSessions(), ["B", "C", "a", "b"])
        with psycopg.connect(self.dsn) as other:
            collations = other.execute(
                "SELECT DISTINCT collation_name FROM information_schema.columns"
                " WHERE table_schema = 'public' AND data_type = 'text'"
            ).fetchall()
        self.assertEqual(collations, [("C",)])


class PostgreSQLIdempotencyTests(PostgreSQLStorageMixin, test_storage.IdempotencyJournalTests):
    pass


class ServiceTests(TestCase):
    async def test_chatNvimExamplesOnPostgreSQL(self) -> None:
        """
        chat.nvim's documented requests, over HTTP, with sessions and the
        queue in PostgreSQL (C{database=}): the same answers as on SQLite.
        """
        dsn = freshDatabase(self)
        import chatweb.testing

        original = chatweb.testing.startChatWeb

        async def onPostgreSQL(testCase: Any, **kwargs: Any) -> Any:
            return await original(testCase, database=dsn, **kwargs)

        self.patch(chatweb.testing, "startChatWeb", onPostgreSQL)
        await test_sessionapi.LocalBackendTests.test_chatNvimExamples(self)  # type: ignore[arg-type]
        import psycopg

        with psycopg.connect(dsn) as connection:
            count = connection.execute("SELECT COUNT(*) FROM events").fetchone()
        self.assertTrue(count[0] > 10)

    async def test_healthzSaysWhenTheDatabaseIsUnreachable(self) -> None:
        """
        Once a write or read could not reach the database server (a POST's
        503, or the queue's sweep), C{GET /healthz} answers 503 C{database
        unreachable}, so that a load balancer sends elsewhere; and C{ok}
        once it is reached again.  The failure is logged in one line, not
        with a traceback.
        """
        from chatweb.testing import startChatWeb

        dsn = freshDatabase(self)
        chatweb = await startChatWeb(self, database=dsn)
        self.assertEqual((await chatweb.get("/healthz")).code, 200)
        self.addCleanup(takeConnections, dsn, True)
        takeConnections(dsn, False)
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.assertEqual((await chatweb.post("s", "while it is down")).code, 503)
        [line] = [e for e in logged if "Could not store" in e.get("log_format", "")]
        self.assertNotIn("log_failure", line)
        self.assertIn("the database is unreachable (", line["log_format"])
        self.assertIn("not currently accepting connections", line["reason"])
        response = await chatweb.get("/healthz")
        self.assertEqual((response.code, await response.json()),
                         (503, {"status": "database unreachable"}))
        takeConnections(dsn, True)
        self.assertEqual((await chatweb.post("s", "once it is back")).code, 204)
        response = await chatweb.get("/healthz")
        self.assertEqual((response.code, await response.json()), (200, {"status": "ok"}))


class UnreachableLogTests(SynchronousTestCase):
    """
    A failure that says the database could not be reached is logged in one
    line; any other with its traceback.
    """

    def logged(self, failure: Failure) -> dict[str, Any]:
        from twisted.logger import Logger

        from chatweb.store._unreachable import logFailure

        events: list[dict[str, Any]] = []
        logFailure(Logger(observer=events.append), failure, "Could not {what}", what="store")
        [event] = events
        return event

    def test_unreachableInOneLine(self) -> None:
        psycopg = importPsycopg()
        event = self.logged(Failure(psycopg.OperationalError("connection failed:\n  refused")))
        self.assertNotIn("log_failure", event)
        self.assertEqual(formatEvent(event),
                         "Could not store: the database is unreachable (connection failed: refused)")

    def test_serverGoingAwayInOneLine(self) -> None:
        psycopg = importPsycopg()
        for error in [psycopg.errors.AdminShutdown("terminating connection"),
                      psycopg.errors.ConnectionFailure("connection failure")]:
            self.assertNotIn("log_failure", self.logged(Failure(error)))

    def test_otherFailuresWithTheirTraceback(self) -> None:
        psycopg = importPsycopg()
        for error in [ZeroDivisionError("a bug"), psycopg.errors.DeadlockDetected("deadlock")]:
            event = self.logged(Failure(error))
            self.assertIs(event["log_failure"].value, error)
            self.assertEqual(formatEvent(event), "Could not store")


def importPsycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise SkipTest("psycopg is not installed")
    return psycopg


class SchemaTests(TestCase):
    async def test_instancesStartingAtOnce(self) -> None:
        """
        Eight instances opening one empty database at once all start (the
        schema is made once, under an advisory lock) and share it.
        """
        dsn = freshDatabase(self)
        dbs = [PostgreSQLDatabase(dsn, reactor) for _ in range(8)]
        for db in dbs:
            self.addCleanup(db.close)
        await gatherResults([db.open(SCHEMA) for db in dbs])
        message = await SQLiteJournal(dbs[0]).append("s", "x", 1.0)
        self.assertEqual(await SQLiteJournal(dbs[4]).pending(), [message])

    async def test_newerSchemaRefused(self) -> None:
        dsn = freshDatabase(self)
        db = PostgreSQLDatabase(dsn, reactor)
        self.addCleanup(db.close)
        await db.open(SCHEMA)
        import psycopg

        with psycopg.connect(dsn) as connection:
            connection.execute("UPDATE chatweb_schema SET version = 99")
        again = PostgreSQLDatabase(dsn, reactor)
        self.addCleanup(again.close)
        failure = await self.assertFailure(again.open(SCHEMA), RuntimeError)
        self.assertIn("newer", str(failure))

    def test_translation(self) -> None:
        self.assertEqual(
            translate("INSERT OR IGNORE INTO sessions (id, created) VALUES (?, ?)")[0],
            "INSERT INTO sessions (id, created) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        )
        self.assertEqual(
            translate("INSERT OR REPLACE INTO t (k, a, b) VALUES (?, ?, ?)")[0],
            "INSERT INTO t (k, a, b) VALUES (%s, %s, %s)"
            " ON CONFLICT (k) DO UPDATE SET a = EXCLUDED.a, b = EXCLUDED.b",
        )


class PasswordTests(TestCase):
    """
    The password reaches PostgreSQL (over TCP, which asks for it) from a
    file, $PGPASSWORD or the DSN, and is never shown.
    """

    def setUp(self) -> None:
        self.server = cluster()
        self.name = self.server.createDatabase()
        self.addCleanup(self.server.dropDatabase, self.name)
        self.logged: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            from twisted.logger import formatEvent

            self.logged.append(formatEvent(event) + repr(event.get("log_failure", "")))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    async def opens(self, dsn: str, password: str | None = None) -> None:
        db = PostgreSQLDatabase(dsn, reactor, password)
        self.addCleanup(db.close)
        await db.open(SCHEMA)
        await SQLiteJournal(db).append("s", "x", 1.0)

    async def test_passwordFromFileOption(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(PASSWORD + "\n")
        options = Options()
        options.parseOptions([
            "--api-key", "k" * 32, "--database", self.server.tcpDSN(self.name),
            "--database-password-file", path,
        ])
        self.assertEqual(options["database-password"], PASSWORD)
        await self.opens(options["database"], options["database-password"])

    async def test_passwordFromEnvironment(self) -> None:
        os.environ["PGPASSWORD"] = PASSWORD
        self.addCleanup(os.environ.pop, "PGPASSWORD")
        await self.opens(self.server.tcpDSN(self.name))

    async def test_passwordInDSNNeverShown(self) -> None:
        dsn = self.server.tcpDSN(self.name).replace(f"{USER}@", f"{USER}:{PASSWORD}@")
        await self.opens(dsn)
        db = PostgreSQLDatabase(dsn, reactor)
        self.assertNotIn(PASSWORD, db.path)
        self.assertNotIn(PASSWORD, redact(f"host=x password={PASSWORD} user=y"))

    async def test_startSaysWhereWithoutThePassword(self) -> None:
        """
        The log says which database a started service uses, its password
        hidden.
        """
        from chatweb.testing import startChatWeb

        dsn = self.server.tcpDSN(self.name).replace(f"{USER}@", f"{USER}:{PASSWORD}@")
        await startChatWeb(self, database=dsn)
        text = "\n".join(self.logged)
        self.assertIn(f"chatweb started on the database postgresql://{USER}:***@127.0.0.1:", text)
        self.assertNotIn(PASSWORD, text)

    async def test_wrongPasswordFailsWithoutShowingIt(self) -> None:
        """
        A wrong password: the service does not start, and neither the log
        nor the error holds the password (or the right one).
        """
        from chatweb.service import ChatWebService

        wrong = "Wr0ng-pass-w0rd-xyz"
        dsn = self.server.tcpDSN(self.name).replace(f"{USER}@", f"{USER}:{wrong}@")
        service = ChatWebService(
            ["k" * 32], os.path.abspath(self.mktemp()), endpoint=None, database=dsn
        )
        os.makedirs(service.dataDir)
        service.startService()
        self.addCleanup(service.stopService)
        failure = await self.assertFailure(service.ready, Exception)
        self.assertIn("password authentication failed", str(failure))
        self.assertNotIn(wrong, str(failure))
        text = "\n".join(self.logged)
        self.assertIn("cannot start on the database postgresql://", text)
        self.assertIn(":***@127.0.0.1", text)
        self.assertNotIn(wrong, text)
        self.assertNotIn(PASSWORD, text)
        import psycopg

        self.assertEqual(len(self.flushLoggedErrors(psycopg.OperationalError)), 1)


class TCPSettingsTests(TestCase):
    """
    Every connection over TCP (the pool's, the writer's, a listener's)
    carries chatweb's keepalives and user timeout (L{TCP_SETTINGS}), unless
    the DSN gives its own.
    """

    def setUp(self) -> None:
        self.server = cluster()
        self.name = self.server.createDatabase()
        self.addCleanup(self.server.dropDatabase, self.name)

    async def settings(self, dsn: str) -> list[dict[str, str]]:
        from chatweb.store._postgresql import TCP_SETTINGS

        db = PostgreSQLDatabase(dsn, reactor, PASSWORD)
        self.addCleanup(db.close)
        await db.open(SCHEMA)

        def ofConnection(connection: Any) -> dict[str, str]:
            given = {o.keyword.decode(): (o.val or b"").decode()
                     for o in connection.pgconn.info}
            return {name: given[name] for name in TCP_SETTINGS}

        listener = await deferToThread(db.connect)
        self.addCleanup(listener.close)
        # (The operations get chatweb's cursor over psycopg's.)
        return [await db.read(lambda cursor: ofConnection(cursor._cursor.connection)),
                await db.write(lambda cursor: ofConnection(cursor._cursor.connection)),
                ofConnection(listener)]

    async def test_chatwebsByDefault(self) -> None:
        expected = {"keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "3",
                    "keepalives_count": "3", "tcp_user_timeout": "20000"}
        self.assertEqual(await self.settings(self.server.tcpDSN(self.name)), [expected] * 3)

    async def test_theDSNsOwnKept(self) -> None:
        dsn = self.server.tcpDSN(self.name) + "?keepalives_idle=42&tcp_user_timeout=5000"
        expected = {"keepalives": "1", "keepalives_idle": "42", "keepalives_interval": "3",
                    "keepalives_count": "3", "tcp_user_timeout": "5000"}
        self.assertEqual(await self.settings(dsn), [expected] * 3)


class RoundTripTests(TestCase):
    async def test_echoAnswersStored(self) -> None:
        """
        The local backend on PostgreSQL answers once per delivery id, even
        when the delivery comes again (a crash before it was recorded).
        """
        db = PostgreSQLDatabase(freshDatabase(self), reactor)
        self.addCleanup(db.close)
        await db.open(SCHEMA)
        backend = LocalBackend(db, reactor, EchoResponder(reactor), eventSink=lambda e: None)
        await backend.deliver(Delivery(1, "ci", "a\x00b", 1.0))
        await backend.deliver(Delivery(1, "ci", "a\x00b", 1.0))
        session = await backend.getSession("ci")
        self.assertEqual(
            [(m.role, m.content) for m in session.messages],
            [("user", "a\x00b"), ("assistant", "a\x00b")],
        )
        events = await SQLiteJournal(db).eventsSince(0)
        self.assertEqual(
            [e.kind.value for e in events],
            ["session.created", "message.added", "message.added"],
        )
        self.assertEqual(json.loads(json.dumps(events[1].data))["delivery"], 1)


@implementer(IResponder)
class CountingResponder:
    """
    Echoes after a short wait, shared by several instances: counts how
    many answers are under way per session at once, across all of them.
    """

    name = "counting"
    answers = True

    def __init__(self, delay: float = 0.005) -> None:
        self.delay = delay
        self.inFlight: dict[str, int] = {}
        self.most = 0

    def respond(self, session: Session, message: Message) -> Deferred[list[Message]]:
        from twisted.internet.task import deferLater

        self.inFlight[session.id] = self.inFlight.get(session.id, 0) + 1
        self.most = max(self.most, self.inFlight[session.id])

        def answer() -> list[Message]:
            self.inFlight[session.id] -= 1
            return [Message(role="assistant", content=message.content, created=0.0)]

        return deferLater(reactor, self.delay, answer)


async def waitFor(condition: Any, timeout: float = 30.0) -> None:
    from twisted.internet.task import deferLater

    waited = 0.0
    while not await condition():
        if waited > timeout:
            raise AssertionError("timed out waiting")
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05


class TwoInstancesTestCase(TestCase):
    """
    Two instances (in this process) on one PostgreSQL database.
    """

    async def startTwo(self, **kwargs: Any) -> tuple[Any, Any]:
        from chatweb.testing import startChatWeb

        self.dsn = freshDatabase(self)
        a = await startChatWeb(self, database=self.dsn, **kwargs)
        b = await startChatWeb(self, database=self.dsn, **kwargs)
        return a, b

    async def sessionMessages(self, instance: Any, session: str) -> list[tuple[str, str]]:
        got = await instance.service.adapter.getSession(session)
        return [] if got is None else [(m.role, m.content) for m in got.messages]


class SeveralInstancesTests(TwoInstancesTestCase):
    async def test_eventsCrossInstances(self) -> None:
        """
        A subscriber to instance A's events sees a message posted through
        instance B, and its answer, in order.
        """
        a, b = await self.startTwo(responder="echo")
        seen: list[Any] = []
        a.service.events.subscribe(seen.append, "ci")
        response = await b.post("ci", "posted on B")
        self.assertEqual(response.code, 204)

        async def answered() -> bool:
            return [e.data["message"]["role"] for e in seen
                    if e.kind.value == "message.added"] == ["user", "assistant"]

        await waitFor(answered)
        kinds = [e.kind.value for e in seen]
        self.assertEqual(kinds[0], "message.queued")
        self.assertIn("delivery.done", kinds)
        self.assertEqual([e.id for e in seen], sorted(e.id for e in seen))
        self.assertEqual(seen[1 + kinds[1:].index("message.added")].data["message"]["content"],
                         "posted on B")

    async def test_everyEventPublishedOnceInOrderOnEachInstance(self) -> None:
        """
        Messages posted at once through two instances: each instance's
        subscribers get every event of both, once, in id order, as the
        event log has them.
        """
        a, b = await self.startTwo(responder="echo")
        before = await a.service.journal.eventsSince(0)
        after = before[-1].id if before else 0
        seen: dict[Any, list[int]] = {a: [], b: []}
        for instance, ids in seen.items():
            instance.service.events.subscribe(lambda e, ids=ids: ids.append(e.id))
        responses = await gatherResults([
            (a if n % 2 else b).post(f"order-{n % 5}", f"message {n}") for n in range(40)
        ])
        self.assertEqual({r.code for r in responses}, {204})

        async def settled() -> bool:
            events = await a.service.journal.eventsSince(after, limit=100000)
            done = sum(e.kind.value == "delivery.done" for e in events)
            return done == 40 and all(
                ids and ids[-1] == events[-1].id for ids in seen.values()
            )

        await waitFor(settled)
        logged = [e.id for e in await a.service.journal.eventsSince(after, limit=100000)]
        self.assertEqual(seen[a], logged)
        self.assertEqual(seen[b], logged)

    async def test_unwatchedInstanceReadsNoEventsBack(self) -> None:
        """
        An instance nothing subscribes to (no stream open) does not read
        back the events another commits; once something subscribes, it
        does, and its subscriber gets each event committed since, once, in
        id order.
        """
        a, b = await self.startTwo()
        shared = a.service.sharedEvents
        eventsSince = a.service.journal.eventsSince

        async def caughtUp() -> bool:
            events = await eventsSince(0, limit=100000)
            return bool(events) and shared.lastId == events[-1].id

        # Once A has heard of B's first write, its start-up read is done.
        await b.post("ci", "first")
        await waitFor(caughtUp)
        reads: list[int] = []

        def spy(after: int, session: str | None = None, limit: int = 1000) -> Any:
            reads.append(after)
            return eventsSince(after, session, limit)

        a.service.journal.eventsSince = spy
        # Both at once: each commits between the other's writes.
        responses = await gatherResults([
            (a if n % 2 else b).post(f"u{n % 4}", f"unwatched {n}") for n in range(40)
        ])
        self.assertEqual({r.code for r in responses}, {204})
        await waitFor(caughtUp)
        self.assertEqual(reads, [])

        skipped = shared.lastId
        seen: list[int] = []
        a.service.events.subscribe(lambda e: seen.append(e.id))
        for n in range(6):
            self.assertEqual((await (a if n % 2 else b).post(f"w{n % 2}", f"watched {n}")).code, 204)

        async def published() -> bool:
            events = await eventsSince(skipped, limit=100000)
            return bool(seen) and seen[-1] == events[-1].id

        await waitFor(published)
        self.assertNotEqual(reads, [])
        self.assertEqual(seen, [e.id for e in await eventsSince(skipped, limit=100000)])

    async def test_failedReadOfNewEventsTriedAgain(self) -> None:
        """
        An instance that could not read the events another committed (no
        connection to be had for a moment) reads them again soon after,
        without waiting for the other to write again.
        """
        from time import monotonic

        a, b = await self.startTwo()
        seen: list[int] = []
        a.service.events.subscribe(lambda e: seen.append(e.id))
        await b.post("ci", "one")

        async def caughtUp() -> bool:
            events = await b.service.journal.eventsSince(0, limit=100000)
            return bool(seen) and seen[-1] == events[-1].id

        await waitFor(caughtUp)
        # As right after a read waited in vain: reads fail at once, a while.
        a.service.database._noConnectionUntil = monotonic() + 1.0
        await b.post("ci", "two")
        await waitFor(caughtUp, timeout=10)

    async def test_streamReplaysWhatAnUnwatchedInstanceSkipped(self) -> None:
        """
        A stream opened on an instance after another committed events it
        did not read (nothing watched it) replays them from the event log,
        then gets the live ones, each once, in order.
        """
        from .test_live import kinds, openStream

        a, b = await self.startTwo(responder="echo")
        for n in range(3):
            await b.post("ci", f"before {n}")

        async def answered() -> bool:
            return len(await self.sessionMessages(a, "ci")) == 6

        await waitFor(answered)
        _, reader = await openStream(
            a, "/events", lambda events: kinds(events).count("delivery.done") == 5,
            headers={"Last-Event-ID": "0"},
        )
        for n in range(2):
            await b.post("ci", f"after {n}")
        events = await reader.done.addTimeout(30, reactor)
        logged = await a.service.journal.eventsSince(0, limit=100000)
        self.assertEqual([int(e["id"]) for e in events],
                         [e.id for e in logged][:len(events)])
        self.assertEqual(kinds(events).count("message.queued"), 5)

    async def test_metricsCountWhatEachInstanceDid(self) -> None:
        """
        Each instance's metrics count the deliveries it made, so that the
        sum over the instances is what was delivered.
        """
        a, b = await self.startTwo(responder="echo")
        responses = await gatherResults([
            (a if n % 2 else b).post(f"m-{n % 3}", f"message {n}") for n in range(12)
        ])
        self.assertEqual({r.code for r in responses}, {204})

        async def delivered() -> bool:
            # Each message and its echo, in each of the three sessions.
            counts = [len(await self.sessionMessages(a, f"m-{n}")) for n in range(3)]
            return counts == [8, 8, 8]

        async def allDone() -> bool:
            events = await a.service.journal.eventsSince(0, limit=10000)
            return sum(e.kind.value == "delivery.done" for e in events) == 12

        await waitFor(delivered)
        await waitFor(allDone)
        # Each hub has had the time to publish every one of them.
        await deferLater(reactor, 0.5, lambda: None)
        counted = [i.service.metrics.deliveries._value.get() for i in (a, b)]
        self.assertEqual(sum(counted), 12, counted)

    async def test_eventsPublishedWhenTheirWriterWentAway(self) -> None:
        """
        Events an instance committed, but whose write's caller never told
        the instance's hub of them (it went away: a delivery cancelled
        while its record was written), are still published there.
        """
        from chatweb.model import EventKind
        from chatweb.store._journal import insertEvents

        a, b = await self.startTwo()
        seen: list[Any] = []
        a.service.events.subscribe(seen.append)

        def record(cursor: Any) -> Any:
            return insertEvents(cursor, [(EventKind.DELIVERY_TEXT, "s", 1.0, {"text": "t"})])

        # Its result goes to no hub.
        [event] = await a.service.database.write(record)

        async def published() -> bool:
            return [e.id for e in seen] == [event.id]

        await waitFor(published, timeout=5.0)

    async def test_oneDeliveryInFlightPerSessionAcrossInstances(self) -> None:
        """
        Messages posted alternately through two instances into two
        sessions are each delivered once, in order, never two at once in a
        session.
        """
        responder = CountingResponder()
        a, b = await self.startTwo(responder=responder, interval=0.2)
        sent: dict[str, list[str]] = {"s1": [], "s2": []}
        for i in range(30):
            for session in sent:
                content = f"{session}-{i}"
                response = await (a if i % 2 else b).post(session, content)
                self.assertEqual(response.code, 204)
                sent[session].append(content)

        async def allDelivered() -> bool:
            for session, contents in sent.items():
                if len(await self.sessionMessages(a, session)) < 2 * len(contents):
                    return False
            return True

        await waitFor(allDelivered)
        for session, contents in sent.items():
            expected = [(role, c) for c in contents for role in ("user", "assistant")]
            self.assertEqual(await self.sessionMessages(b, session), expected)
        self.assertEqual(responder.most, 1)

    async def test_expiredLeaseTakenOver(self) -> None:
        """
        A session whose lease is held by an instance that died (it renews
        no more) is delivered by another once the lease has expired.
        """
        a, b = await self.startTwo(responder="echo", interval=0.2)
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as connection:
            connection.execute(
                "INSERT INTO leases (session, owner, expires) VALUES"
                " ('ci', 'dead', EXTRACT(EPOCH FROM clock_timestamp()) + 1.5)"
            )
        start = reactor.seconds()
        await b.post("ci", "after the crash")

        async def answered() -> bool:
            return len(await self.sessionMessages(a, "ci")) == 2

        await waitFor(answered)
        self.assertGreater(reactor.seconds() - start, 1.0)
        self.assertEqual(await self.sessionMessages(a, "ci"),
                         [("user", "after the crash"), ("assistant", "after the crash")])


class _NoListener(Clock):
    def callInThread(self, f: Any, *args: Any) -> None:
        pass  # no LISTEN thread: nothing else commits


class _LastEventIs:
    def read(self, operation: Any) -> Deferred[int]:
        return succeed(10)


class SharedEventsTests(SynchronousTestCase):
    """
    An instance's own event that comes after a gap (another instance
    committed events in between, not yet heard of) is read back with what
    it missed only when something in the instance wants the events.
    """

    def ownEventAfterAGap(self, wanted: bool) -> tuple[SharedEvents, list[int], list[int]]:
        clock = _NoListener()
        reads: list[int] = []
        published: list[int] = []

        def reader(after: int) -> Deferred[list[Any]]:
            reads.append(after)
            return succeed([Event(n, EventKind.MESSAGE_QUEUED, "s", 1.0) for n in (11, 12, 13)])

        shared = SharedEvents(_LastEventIs(), reader, lambda e: published.append(e.id),  # type: ignore[arg-type]
                              clock, wanted=lambda: wanted)
        shared.start()
        shared.changed(Event(13, EventKind.MESSAGE_QUEUED, "s", 1.0))
        clock.advance(0)
        return shared, reads, published

    def test_readWhenWanted(self) -> None:
        shared, reads, published = self.ownEventAfterAGap(wanted=True)
        self.assertEqual((reads, published, shared.lastId), ([10], [11, 12, 13], 13))

    def test_notReadWhenNotWanted(self) -> None:
        shared, reads, published = self.ownEventAfterAGap(wanted=False)
        self.assertEqual((reads, published, shared.lastId), ([], [13], 13))


class OneWriteAcrossInstancesTests(TwoInstancesTestCase):
    """
    Without a responder, a message to a session nothing else is under way
    for is stored and delivered in one write on PostgreSQL too, unless
    another instance delivers the session or has stored messages of it
    first (asked in that write).
    """

    def spyClaims(self, instance: Any, claims: list[str]) -> None:
        leases = instance.service.leases
        claim = leases.claim

        def spy(session: str) -> Deferred[bool]:
            claims.append(session)
            return claim(session)

        leases.claim = spy

    async def test_idleSessionDeliveredInTheWriteThatStoresIt(self) -> None:
        a, b = await self.startTwo()
        claims: list[str] = []
        self.spyClaims(a, claims)
        self.spyClaims(b, claims)
        for n in range(3):
            response = await (a if n % 2 else b).post("ci", f"m{n}")
            self.assertEqual(response.code, 204)
            # Delivered when the 204 came, no lease taken.
            self.assertEqual(await self.sessionMessages(a, "ci"),
                             [("user", f"m{k}") for k in range(n + 1)])
        self.assertEqual(claims, [])

    async def test_notWhileAnotherInstanceHoldsTheLease(self) -> None:
        """
        Posts to a session whose lease another instance holds wait for it,
        and are delivered, in order, as soon as its release is committed
        (its NOTIFY), not at the next sweep.
        """
        a, b = await self.startTwo(interval=600)
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as connection:
            connection.execute(
                "INSERT INTO leases (session, owner, expires) VALUES"
                " ('ci', 'elsewhere', EXTRACT(EPOCH FROM clock_timestamp()) + 600)"
            )
            for n in range(3):
                response = await (a if n % 2 else b).post("ci", f"m{n}")
                self.assertEqual(response.code, 204)
            self.assertEqual(await self.sessionMessages(a, "ci"), [])
            for instance in (a, b):
                queues = instance.service.queue._queues
                await waitFor(lambda: _true("ci" in queues and queues["ci"].leaseTaken))
            connection.execute("DELETE FROM leases WHERE owner = 'elsewhere'")
            connection.execute("SELECT pg_notify(%s, 'elsewhere')", (CHANNEL,))

        async def delivered() -> bool:
            return len(await self.sessionMessages(a, "ci")) == 3

        await waitFor(delivered, timeout=10)
        self.assertEqual(await self.sessionMessages(b, "ci"),
                         [("user", f"m{n}") for n in range(3)])

    async def test_notBeforeMessagesStoredFirst(self) -> None:
        """
        A message of the session stored first and not delivered yet (by an
        instance that stopped before delivering it) goes first.
        """
        a, b = await self.startTwo(interval=0.2)
        other = PostgreSQLDatabase(self.dsn, reactor)
        self.addCleanup(other.close)
        await other.open(SCHEMA)
        await SQLiteJournal(other).append("ci", "older", 1.0)
        await a.post("ci", "newer")

        async def delivered() -> bool:
            return len(await self.sessionMessages(b, "ci")) == 2

        await waitFor(delivered)
        self.assertEqual(await self.sessionMessages(b, "ci"),
                         [("user", "older"), ("user", "newer")])


class LeaseReleasedElsewhereTests(TestCase):
    async def test_releasedLeaseTakenOnNotice(self) -> None:
        """
        A session whose lease another instance holds is delivered as soon
        as that instance's release is committed (its NOTIFY), not at the
        next sweep.
        """
        dsn = freshDatabase(self)  # (skips without PostgreSQL and psycopg)
        import psycopg

        from chatweb.testing import startChatWeb

        a = await startChatWeb(self, database=dsn, responder="echo", interval=600)
        with psycopg.connect(dsn, autocommit=True) as other:
            other.execute(
                "INSERT INTO leases (session, owner, expires) VALUES"
                " ('ci', 'other', EXTRACT(EPOCH FROM clock_timestamp()) + 600)"
            )
            await a.post("ci", "held elsewhere")
            await waitFor(lambda: _true(a.service.queue._queues["ci"].leaseTaken))
            other.execute("DELETE FROM leases WHERE owner = 'other'")
            other.execute("SELECT pg_notify(%s, 'other')", (CHANNEL,))

        async def answered() -> bool:
            got = await a.service.adapter.getSession("ci")
            return got is not None and len(got.messages) == 2

        await waitFor(answered, timeout=10)


async def _true(value: bool) -> bool:
    return value


class MigrateTests(TestCase):
    """
    C{python -m chatweb migrate --to postgresql://...}, as a user runs it.
    """

    async def runMigrate(self, *args: str) -> tuple[int, str]:
        import sys

        from twisted.internet.utils import getProcessOutputAndValue

        import chatweb

        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(chatweb.__file__)))
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "chatweb", "migrate", *args], env=env
        )
        return code, (out + err).decode()

    async def test_sessionsQueuedAndFailedMovedIntact(self) -> None:
        from chatweb.store._sqlite import SQLiteDatabase
        from chatweb.testing import startChatWeb

        dataDir = os.path.abspath(self.mktemp())
        os.makedirs(dataDir)
        db = SQLiteDatabase(os.path.join(dataDir, "chatweb.sqlite3"), reactor)
        await db.open(SCHEMA)
        journal = SQLiteJournal(db, eventSink=lambda e: None)
        backend = LocalBackend(db, reactor, EchoResponder(reactor), eventSink=lambda e: None)
        delivered = await journal.append("done", "answered \x00 before", 1.0)
        await backend.deliver(delivered.delivery())
        await journal.markDelivered(delivered.id)
        failed = await journal.append("broken", "failed for good", 2.0)
        await journal.recordFailure(failed.id, "RuntimeError: no", True)
        now = reactor.seconds()
        # As the API stores an Idempotency-Key: scoped by the API key.
        import hashlib

        scope = hashlib.sha256(b"test-api-key").hexdigest()[:16]
        queued = [await journal.append("ci", f"queued {n}", now - 60 + n, f"{scope}:key-{n}")
                  for n in range(3)]
        await db.close()

        dsn = self.dsnFor()
        code, output = await self.runMigrate("--data-dir", dataDir, "--to", dsn)
        self.assertEqual(code, 0, output)
        self.assertIn("2 messages", output)
        self.assertIn("5 queue", output)
        # Into a database that already holds a store: refused, nothing written.
        code, output = await self.runMigrate("--data-dir", dataDir, "--to", dsn)
        self.assertEqual(code, 1)
        self.assertIn("already holds chatweb data", output)

        chatweb = await startChatWeb(self, database=dsn, responder="echo")
        service = chatweb.service
        session = await service.adapter.getSession("done")
        self.assertEqual([(m.role, m.content) for m in session.messages],
                         [("user", "answered \x00 before"), ("assistant", "answered \x00 before")])
        self.assertEqual(await service.journal.failedSessions(), ["broken"])
        [dead] = await service.journal.messages("broken")
        self.assertEqual((dead.id, dead.lastError), (failed.id, "RuntimeError: no"))
        # The idempotency keys came along: a retried POST is not stored twice.
        response = await chatweb.client.post(
            chatweb.url + "/", json={"session": "ci", "content": "queued 0"},
            headers={**chatweb.headers, "Idempotency-Key": "key-0"})
        await response.content()
        self.assertEqual(response.headers.getRawHeaders("x-message-id"), [str(queued[0].id)])
        await service.queue.whenDelivered()
        session = await service.adapter.getSession("ci")
        self.assertEqual([m.content for m in session.messages if m.role == "user"],
                         ["queued 0", "queued 1", "queued 2"])
        # New ids continue after the copied ones.
        response = await chatweb.post("ci", "after")
        await response.content()
        await service.queue.whenDelivered()
        self.assertGreater(int(response.headers.getRawHeaders("x-message-id")[0]), queued[-1].id)

    def dsnFor(self) -> str:
        return freshDatabase(self)

    async def test_notWhileChatwebRuns(self) -> None:
        """
        While a chatweb runs on the data directory, migrate refuses in one
        line and copies nothing (what chatweb stored meanwhile would be
        left behind).
        """
        from chatweb.service import ChatWebService

        dataDir = os.path.abspath(self.mktemp())
        os.makedirs(dataDir)
        service = ChatWebService(["k" * 32], dataDir, endpoint=None)
        service.startService()
        self.addCleanup(service.stopService)
        await service.ready
        dsn = self.dsnFor()
        code, output = await self.runMigrate("--data-dir", dataDir, "--to", dsn)
        self.assertEqual((code, output.strip()), (1, (
            f"chatweb: {dataDir} is in use by another chatweb (process {os.getpid()}):"
            " stop it first")))
        await service.stopService()
        code, output = await self.runMigrate("--data-dir", dataDir, "--to", dsn)
        self.assertEqual(code, 0, output)

    async def test_wrongPasswordNotShown(self) -> None:
        dataDir = os.path.abspath(self.mktemp())
        os.makedirs(dataDir)
        from chatweb.store._sqlite import SQLiteDatabase

        db = SQLiteDatabase(os.path.join(dataDir, "chatweb.sqlite3"), reactor)
        await db.open(SCHEMA)
        await db.close()
        server = cluster()
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("Not-The-Password-42")
        code, output = await self.runMigrate(
            "--data-dir", dataDir, "--to", server.tcpDSN(), "--database-password-file", path)
        self.assertEqual(code, 1)
        self.assertIn("password authentication failed", output)
        self.assertNotIn("Not-The-Password-42", output)


class EventStreamAcrossInstancesTests(TestCase):
    async def test_streamOnASeesPostThroughB(self) -> None:
        """
        A client following C{GET /sessions/ci/events} on instance A sees the
        message posted through instance B queued, answered and delivered.
        """
        from chatweb.testing import startChatWeb

        from .test_live import doneWith, kinds, openStream

        dsn = freshDatabase(self)
        a = await startChatWeb(self, database=dsn, responder="echo")
        b = await startChatWeb(self, database=dsn, responder="echo")
        response, reader = await openStream(a, "/sessions/ci/events", doneWith)
        self.assertEqual(response.code, 200)
        posted = await b.post("ci", "posted on B")
        self.assertEqual(posted.code, 204)
        events = await reader.done
        self.assertEqual(kinds(events)[0], "message.queued")
        self.assertEqual(kinds(events)[-1], "delivery.done")
        added = [e["data"]["data"]["message"] for e in events if e["event"] == "message.added"]
        self.assertEqual([(m["role"], m["content"]) for m in added],
                         [("user", "posted on B"), ("assistant", "posted on B")])
