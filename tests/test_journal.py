"""
The IJournal contract: one suite of what every journal promises, run against
each engine (the SQLite journal and the in-memory one of chatweb.testing).

A new storage engine adds a TestCase that mixes in L{JournalContractMixin}
and says how to make an empty journal (L{JournalContractMixin.makeJournal}).
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from chatweb.store._postgresql import PostgreSQLDatabase
from chatweb.store._sqlite import SQLiteDatabase
from chatweb.errors import IdempotencyConflict, UnknownMessage, WrongState
from chatweb.interfaces import IJournal
from chatweb.store._journal import IDEMPOTENCY_WINDOW, SCHEMA, UPGRADES, SQLiteJournal
from chatweb.model import DELIVERED, DISCARDED, FAILED, PENDING, Event, EventKind
from chatweb.testing import MemoryJournal

from .postgres import freshDatabase

T0 = 1_700_000_000.0


class JournalContractMixin:
    """
    The tests every L{IJournal} passes.  Mix into a trial C{TestCase} that
    defines L{makeJournal}.
    """

    # Provided by the TestCase this is mixed into.
    assertEqual: Any
    assertFalse: Any
    assertTrue: Any
    assertFailure: Any
    assertIsNone: Any

    async def makeJournal(self, now: Any = None) -> Any:
        """
        A new, empty journal (an L{IJournal}) whose clock is C{now} (a
        callable), closed if need be when the test ends.
        """
        raise NotImplementedError

    async def contents(self, journal: Any) -> list[tuple[int, str, str]]:
        return [(m.id, m.content, m.state) for m in await journal.pending()]

    async def test_providesIJournal(self) -> None:
        journal = await self.makeJournal()
        self.assertTrue(verifyObject(IJournal, journal))

    async def test_appendStoresAPendingMessage(self) -> None:
        """
        An appended message comes back as stored: its session, content and
        time, pending, no attempts, not a duplicate; ids increase.
        """
        journal = await self.makeJournal()
        text = "héllo 世界 🎉 \x00 <b>"
        first = await journal.append("セッション", text, T0)
        second = await journal.append("ci", "two", T0 + 1)
        self.assertEqual(
            (first.session, first.content, first.received, first.state, first.attempts),
            ("セッション", text, T0, PENDING, 0),
        )
        self.assertEqual((first.lastError, first.duplicate), (None, False))
        self.assertTrue(second.id > first.id)
        self.assertEqual(await journal.pending(), [first, second])

    async def test_pendingInIdOrderAcrossSessions(self) -> None:
        journal = await self.makeJournal()
        ids = [(await journal.append(s, c, T0)).id for s, c in
               [("a", "1"), ("b", "2"), ("a", "3")]]
        self.assertEqual(await self.contents(journal),
                         [(ids[0], "1", PENDING), (ids[1], "2", PENDING), (ids[2], "3", PENDING)])

    async def test_markDelivered(self) -> None:
        """
        A delivered message is neither pending nor among its session's
        messages.
        """
        journal = await self.makeJournal()
        first = await journal.append("ci", "one", T0)
        second = await journal.append("ci", "two", T0)
        await journal.markDelivered(first.id)
        self.assertEqual(await journal.pending(), [second])
        self.assertEqual(await journal.messages("ci"), [second])

    async def test_failureRetriedThenFinal(self) -> None:
        """
        A failure that is not final keeps the message pending, counted and
        with its error; a final one makes it a dead letter: not pending,
        still among its session's messages, its session listed as failed.
        """
        journal = await self.makeJournal()
        message = await journal.append("ci", "x", T0)
        once = await journal.recordFailure(message.id, "RuntimeError: no", False)
        self.assertEqual((once.id, once.attempts, once.state, once.lastError),
                         (message.id, 1, PENDING, "RuntimeError: no"))
        self.assertEqual(await journal.pending(), [once])
        self.assertEqual(await journal.failedSessions(), [])
        dead = await journal.recordFailure(message.id, "RuntimeError: still no", True)
        self.assertEqual((dead.attempts, dead.state, dead.lastError),
                         (2, FAILED, "RuntimeError: still no"))
        self.assertEqual(await journal.pending(), [])
        self.assertEqual(await journal.messages("ci"), [dead])
        self.assertEqual(await journal.failedSessions(), ["ci"])

    async def test_messagesOfOneSessionPendingAndFailed(self) -> None:
        journal = await self.makeJournal()
        failed = await journal.append("ci", "failed", T0)
        await journal.append("other", "elsewhere", T0)
        delivered = await journal.append("ci", "delivered", T0)
        pending = await journal.append("ci", "pending", T0)
        failed = await journal.recordFailure(failed.id, "E", True)
        await journal.markDelivered(delivered.id)
        self.assertEqual(await journal.messages("ci"), [failed, pending])
        self.assertEqual(await journal.messages("nobody"), [])

    async def test_failedSessionsListsEachOnce(self) -> None:
        journal = await self.makeJournal()
        for session in ("b", "a", "b", "c"):
            message = await journal.append(session, "x", T0)
            if session != "c":
                await journal.recordFailure(message.id, "E", True)
        self.assertEqual(sorted(await journal.failedSessions()), ["a", "b"])

    async def test_requeueMakesAFailedMessagePendingAgain(self) -> None:
        """
        A requeued message is pending again, its attempts reset, in its
        place by id.
        """
        journal = await self.makeJournal()
        first = await journal.append("ci", "first", T0)
        second = await journal.append("ci", "second", T0)
        await journal.recordFailure(first.id, "E", True)
        requeued = await journal.requeue(first.id)
        self.assertEqual((requeued.id, requeued.state, requeued.attempts), (first.id, PENDING, 0))
        self.assertEqual([m.id for m in await journal.pending()], [first.id, second.id])
        self.assertEqual(await journal.failedSessions(), [])
        again = await journal.recordFailure(first.id, "E", False)
        self.assertEqual(again.attempts, 1)

    async def test_requeueRefusesWhatIsNotFailed(self) -> None:
        journal = await self.makeJournal()
        pending = await journal.append("ci", "x", T0)
        delivered = await journal.append("ci", "y", T0)
        await journal.markDelivered(delivered.id)
        await self.assertFailure(journal.requeue(pending.id), WrongState)
        await self.assertFailure(journal.requeue(delivered.id), WrongState)
        await self.assertFailure(journal.requeue(delivered.id + 100), UnknownMessage)
        self.assertEqual(await self.contents(journal), [(pending.id, "x", PENDING)])

    async def test_discardPendingOrFailed(self) -> None:
        """
        A discarded message is kept as discarded, and is neither pending,
        nor among its session's messages, nor a dead letter.
        """
        journal = await self.makeJournal()
        pending = await journal.append("ci", "p", T0)
        failed = await journal.append("ci", "f", T0)
        await journal.recordFailure(failed.id, "E", True)
        for message in (pending, failed):
            discarded = await journal.discard(message.id)
            self.assertEqual((discarded.id, discarded.state), (message.id, DISCARDED))
        self.assertEqual(await journal.pending(), [])
        self.assertEqual(await journal.messages("ci"), [])
        self.assertEqual(await journal.failedSessions(), [])

    async def test_discardRefusesWhatIsDoneOrUnknown(self) -> None:
        journal = await self.makeJournal()
        delivered = await journal.append("ci", "d", T0)
        await journal.markDelivered(delivered.id)
        discarded = await journal.append("ci", "x", T0)
        await journal.discard(discarded.id)
        await self.assertFailure(journal.discard(delivered.id), WrongState)
        await self.assertFailure(journal.discard(discarded.id), WrongState)
        await self.assertFailure(journal.requeue(discarded.id), WrongState)
        await self.assertFailure(journal.discard(discarded.id + 100), UnknownMessage)

    async def test_idempotencyKeyAnswersWithTheFirstMessage(self) -> None:
        """
        The same key, session and content within 24 hours stores nothing
        and answers with the message stored then, marked duplicate, in
        whatever state it is now.
        """
        journal = await self.makeJournal()
        first = await journal.append("ci", "x", T0, "key")
        again = await journal.append("ci", "x", T0 + 60, "key")
        self.assertEqual((again, again.duplicate), (first, True))
        self.assertEqual(await journal.pending(), [first])
        await journal.markDelivered(first.id)
        late = await journal.append("ci", "x", T0 + IDEMPOTENCY_WINDOW, "key")
        self.assertEqual((late.id, late.state, late.duplicate), (first.id, DELIVERED, True))
        self.assertEqual(await journal.pending(), [])

    async def test_idempotencyKeyWithOtherSessionOrContentConflicts(self) -> None:
        journal = await self.makeJournal()
        first = await journal.append("ci", "x", T0, "key")
        await self.assertFailure(journal.append("other", "x", T0 + 1, "key"), IdempotencyConflict)
        await self.assertFailure(journal.append("ci", "y", T0 + 1, "key"), IdempotencyConflict)
        self.assertEqual(await journal.pending(), [first])

    async def test_idempotencyKeysAreIndependent(self) -> None:
        journal = await self.makeJournal()
        a = await journal.append("ci", "x", T0, "a")
        b = await journal.append("ci", "x", T0, "b")
        plain = await journal.append("ci", "x", T0)
        self.assertEqual(len({a.id, b.id, plain.id}), 3)
        self.assertFalse(a.duplicate or b.duplicate or plain.duplicate)

    async def test_idempotencyKeyForgottenAfter24Hours(self) -> None:
        """
        Past the window (measured by the times the messages were received),
        the key is new again: the same message is stored anew, and other
        content is no conflict.
        """
        journal = await self.makeJournal()
        first = await journal.append("ci", "x", T0, "key")
        later = await journal.append("ci", "x", T0 + IDEMPOTENCY_WINDOW + 1, "key")
        self.assertFalse(later.duplicate)
        self.assertTrue(later.id > first.id)
        # The key now belongs to the second message, for another day.
        again = await journal.append("ci", "x", T0 + 2 * IDEMPOTENCY_WINDOW, "key")
        self.assertEqual((again.id, again.duplicate), (later.id, True))
        other = await journal.append("ci", "y", T0 + 3 * IDEMPOTENCY_WINDOW + 2, "key")
        self.assertFalse(other.duplicate)
        self.assertEqual([m.id for m in await journal.pending()], [first.id, later.id, other.id])


    # -- the event log

    async def test_eachChangeRecordsAnEvent(self) -> None:
        """
        Queued, failed, requeued, delivered and discarded messages each
        leave an event, with increasing ids, given to the event sink once
        committed and read back by eventsSince; a duplicate append leaves
        none.
        """
        journal = await self.makeJournal(now=lambda: T0 + 5)
        published: list[Event] = []
        journal.eventSink = published.append
        a = await journal.append("a", "one", T0, "k")
        await journal.append("a", "one", T0, "k")
        b = await journal.append("b", "two", T0 + 1)
        await journal.recordFailure(a.id, "boom", True)
        await journal.requeue(a.id)
        await journal.markDelivered(a.id)
        await journal.discard(b.id)
        expected = [
            (EventKind.MESSAGE_QUEUED, "a", T0, a.id),
            (EventKind.MESSAGE_QUEUED, "b", T0 + 1, b.id),
            (EventKind.DELIVERY_FAILED, "a", T0 + 5, a.id),
            (EventKind.MESSAGE_QUEUED, "a", T0 + 5, a.id),
            (EventKind.DELIVERY_DONE, "a", T0 + 5, a.id),
            (EventKind.MESSAGE_DISCARDED, "b", T0 + 5, b.id),
        ]
        events = await journal.eventsSince(0)
        self.assertEqual(
            [(e.kind, e.session, e.time, e.data["message"]) for e in events], expected
        )
        self.assertEqual(published, events)
        ids = [e.id for e in events]
        self.assertEqual(ids, sorted(set(ids)))
        self.assertEqual(events[2].data["final"], True)
        self.assertEqual(events[2].data["error"], "boom")

    async def test_eventsSinceBySessionAfterAnIdWithALimit(self) -> None:
        journal = await self.makeJournal()
        for i in range(3):
            await journal.append("a", str(i), T0)
            await journal.append("b", str(i), T0)
        allEvents = await journal.eventsSince(0)
        ofA = await journal.eventsSince(0, session="a")
        self.assertEqual([e for e in allEvents if e.session == "a"], ofA)
        self.assertEqual(await journal.eventsSince(ofA[0].id, "a", limit=1), [ofA[1]])
        self.assertEqual(await journal.eventsSince(allEvents[-1].id), [])

    async def test_logEventAndPrune(self) -> None:
        """
        logEvent records an event that is not a journal change; pruneEvents
        forgets those older than the time given, and ids never go back.
        """
        clock = [T0]
        journal = await self.makeJournal(now=lambda: clock[0])
        published: list[Event] = []
        journal.eventSink = published.append
        old = await journal.logEvent(EventKind.DELIVERY_STARTED, "s", {"message": 1})
        self.assertEqual(published, [old])
        clock[0] = T0 + 100
        new = await journal.logEvent(EventKind.SESSION_CREATED, "s")
        self.assertEqual(await journal.pruneEvents(T0 + 50), 1)
        self.assertEqual(await journal.eventsSince(0), [new])
        newer = await journal.logEvent(EventKind.SESSION_CLEARED, "s")
        self.assertTrue(newer.id > new.id > old.id)
        self.assertEqual(new.asJSON()["kind"], "session.created")

    async def test_pendingSessionsAndNextPending(self) -> None:
        journal = await self.makeJournal()
        a1 = await journal.append("a", "1", T0)
        a2 = await journal.append("a", "2", T0)
        b1 = await journal.append("b", "3", T0)
        await journal.recordFailure(b1.id, "x", True)
        self.assertEqual(await journal.pendingSessions(), {"a": (2, a2.id)})
        self.assertEqual(await journal.nextPending("a"), a1)
        await journal.markDelivered(a1.id)
        self.assertEqual(await journal.nextPending("a"), a2)
        self.assertIsNone(await journal.nextPending("b"))


class SQLiteJournalContractTests(JournalContractMixin, TestCase):
    async def makeJournal(self, now: Any = None) -> IJournal:
        db = SQLiteDatabase(os.path.abspath(self.mktemp()) + ".sqlite3", reactor)
        self.addCleanup(db.close)
        await db.open(SCHEMA)
        return SQLiteJournal(db, now=now or (lambda: 0.0))


    async def test_expiredKeysForgottenAtThePrune(self) -> None:
        """
        Idempotency keys past their window are deleted when the event log
        is pruned (once a minute), not kept for ever; the others stay.
        """
        now = [T0]
        journal = await self.makeJournal(now=lambda: now[0])
        await journal.append("ci", "x", T0, "old")
        await journal.append("ci", "y", T0 + IDEMPOTENCY_WINDOW, "new")
        now[0] = T0 + IDEMPOTENCY_WINDOW + 1
        await journal.pruneEvents(0.0)
        keys = await journal._db.read(
            lambda cursor: [r[0] for r in cursor.execute("SELECT key FROM idempotency")]
        )
        self.assertEqual(keys, ["new"])


class PostgreSQLJournalContractTests(JournalContractMixin, TestCase):
    """
    The same contract on PostgreSQL (a real server: see L{tests.postgres}).
    """

    async def makeJournal(self, now: Any = None) -> IJournal:
        db = PostgreSQLDatabase(freshDatabase(self), reactor)
        self.addCleanup(db.close)
        await db.open(SCHEMA)
        return SQLiteJournal(db, now=now or (lambda: 0.0))


class MemoryJournalContractTests(JournalContractMixin, TestCase):
    async def makeJournal(self, now: Any = None) -> IJournal:
        return MemoryJournal(now=now)


# The schema of the first release (no versions, no events), as it made
# databases: a session's messages all indexed, delivered or not.
OLD_SCHEMA = [
    "CREATE INDEX IF NOT EXISTS queue_by_session ON queue (session, id)"
    if "queue_open_by_session" in s
    else s
    for s in SCHEMA
    if isinstance(s, str)
]


def _indexes(path: str) -> set[tuple[str, str]]:
    connection = sqlite3.connect(path)
    try:
        return set(
            connection.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            )
        )
    finally:
        connection.close()


class SchemaUpgradeTests(TestCase):
    async def test_oldDatabaseUpgradedInPlace(self) -> None:
        """
        A database made by the first release (version 0, no events table)
        is upgraded when opened: its messages are kept and events work.
        """
        path = os.path.abspath(self.mktemp()) + ".sqlite3"
        connection = sqlite3.connect(path)
        for statement in OLD_SCHEMA:
            connection.execute(statement)
        connection.execute(
            "INSERT INTO queue (session, content, received) VALUES ('s', 'kept', 1.0)"
        )
        connection.commit()
        connection.close()
        db = SQLiteDatabase(path, reactor)
        self.addCleanup(db.close)
        await db.open(SCHEMA)
        journal = SQLiteJournal(db)
        self.assertEqual([m.content for m in await journal.pending()], ["kept"])
        event = await journal.logEvent(EventKind.SESSION_CHANGED, "s")
        self.assertEqual(await journal.eventsSince(0), [event])
        await db.close()
        connection = sqlite3.connect(path)
        self.addCleanup(connection.close)
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        self.assertEqual(version, UPGRADES.version)
        # Its indexes are a new database's (none left from the old schema).
        fresh = os.path.abspath(self.mktemp()) + ".sqlite3"
        db = SQLiteDatabase(fresh, reactor)
        await db.open(SCHEMA)
        await db.close()
        self.assertEqual(_indexes(path), _indexes(fresh))

    async def test_newerDatabaseRefused(self) -> None:
        path = os.path.abspath(self.mktemp()) + ".sqlite3"
        connection = sqlite3.connect(path)
        connection.execute(f"PRAGMA user_version = {UPGRADES.version + 1}")
        connection.close()
        db = SQLiteDatabase(path, reactor)
        self.addCleanup(db.close)
        await self.assertFailure(db.open(SCHEMA), RuntimeError)


class _Recording:
    """
    A cursor that keeps each statement it runs, with its parameters.
    """

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor
        self.statements: list[tuple[str, tuple[Any, ...]]] = []

    def execute(self, sql: str, parameters: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        self.statements.append((sql, parameters))
        return self._cursor.execute(sql, parameters)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class SessionLookupTests(TestCase):
    """
    The index of a session's messages holds only those not delivered (most
    messages are delivered: they cost a write each for nothing); the
    lookups of a session's messages use it, not a scan of every pending
    message.
    """

    def test_lookupsUseTheIndexOfOpenMessages(self) -> None:
        from chatweb.store import _journal
        from chatweb.store._sqlite import _upgrade, applySchema

        connection = sqlite3.connect(":memory:")
        self.addCleanup(connection.close)
        cursor = connection.cursor()
        applySchema(cursor, SCHEMA, _upgrade)
        recording = _Recording(cursor)
        _journal._undelivered(recording, "s")  # type: ignore[arg-type]
        _journal._nextPending(recording, "s", 0)  # type: ignore[arg-type]
        self.assertEqual(len(recording.statements), 2)
        for sql, parameters in recording.statements:
            plan = " ".join(
                row[-1] for row in cursor.execute("EXPLAIN QUERY PLAN " + sql, parameters)
            )
            self.assertIn("USING INDEX queue_open_by_session (session=?", plan, sql)

    def test_deliveredMessagesNotIndexedBySession(self) -> None:
        from chatweb.store import _journal
        from chatweb.store._sqlite import _upgrade, applySchema

        connection = sqlite3.connect(":memory:")
        self.addCleanup(connection.close)
        cursor = connection.cursor()
        applySchema(cursor, SCHEMA, _upgrade)
        # (seq, name, unique, origin, partial) of each index of the queue.
        partial = {row[1]: row[4] for row in cursor.execute("PRAGMA index_list(queue)")}
        self.assertEqual(partial["queue_open_by_session"], 1)
        self.assertNotIn("queue_by_session", partial)
        _journal._append(cursor, "s", "delivered", T0, None, DELIVERED)
        _journal._append(cursor, "s", "failed", T0, None, FAILED)
        _journal._append(cursor, "s", "pending", T0, None)
        self.assertEqual(
            [m.content for m in _journal._undelivered(cursor, "s")], ["failed", "pending"]
        )
        self.assertEqual(_journal._nextPending(cursor, "s", 0).content, "pending")
