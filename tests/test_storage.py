"""
The SQLite database, the journal and the default backend, on real files.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from time import perf_counter

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from chatweb.backends.local import SCHEMA as SESSIONS_SCHEMA
from chatweb.backends.local import LocalBackend, sessionIdFor
from chatweb.backends.responders import EchoResponder
from chatweb.errors import UnknownMessage
from chatweb.store._sqlite import SQLiteDatabase
from chatweb.store._journal import SCHEMA as JOURNAL_SCHEMA
from chatweb.store._journal import SQLiteJournal
from chatweb.model import DELIVERED, FAILED, Delivery, Message, Session


class StorageTestCase(TestCase):
    def setUp(self) -> Deferred:
        self.path = os.path.join(self.mktemp() + ".sqlite3")
        self.db = self.openDatabase()
        return self.db.open(JOURNAL_SCHEMA + SESSIONS_SCHEMA)

    def openDatabase(self) -> SQLiteDatabase:
        db = SQLiteDatabase(self.path, reactor)
        self.addCleanup(db.close)
        return db

    def writeElsewhere(self, statement: str) -> None:
        """
        Run C{statement} on a connection of its own, as another process on
        the same store would.
        """
        with sqlite3.connect(self.path) as other:
            other.execute(statement)
        other.close()

    def reopen(self) -> Deferred:
        closing = self.db.close()
        self.db = self.openDatabase()
        return closing.addCallback(
            lambda _: self.db.open(JOURNAL_SCHEMA + SESSIONS_SCHEMA)
        )


class DatabaseTests(StorageTestCase):
    async def test_closedWithoutOpening(self) -> None:
        """
        A database closed without being opened closes at once; a write
        asked for before fails, saying the database is closed.
        """
        from chatweb.store._sqlite import DatabaseClosed

        db = self.openDatabase()
        write = db.write(lambda cursor: None)
        await db.close().addTimeout(5, reactor)
        with self.assertRaises(DatabaseClosed):
            await write

    @inlineCallbacks
    def test_writesArriveTogetherCommitTogether(self):
        """
        Writes asked for while a commit is under way are grouped into the
        next transaction; each caller still gets its own result.
        """
        import chatweb.store._sqlite

        batches = []
        original = chatweb.store._sqlite._runBatch

        def countingRunBatch(connection, batch):
            batches.append(len(batch))
            return original(connection, batch)

        self.patch(chatweb.store._sqlite, "_runBatch", countingRunBatch)

        def insert(cursor, n):
            cursor.execute("INSERT INTO sessions (id, created) VALUES (?, 0)", (str(n),))
            return n

        results = yield gatherResults([self.db.write(insert, n) for n in range(50)])
        self.assertEqual(results, list(range(50)))
        ids = yield self.db.read(lambda c: [r[0] for r in c.execute("SELECT id FROM sessions").fetchall()])
        self.assertEqual(sorted(ids, key=int), [str(n) for n in range(50)])
        # The first write goes alone; the 49 asked for meanwhile go together.
        self.assertEqual(batches, [1, 49])

    def slowAnswers(self, count: int, answered: list, first) -> list:
        """
        C{count} writes grouped in one commit, whose callers each take a
        millisecond of CPU to handle the answer; C{first()} is called in
        the first one's handler.
        """

        def handler(n):
            def handle(_):
                end = perf_counter() + 0.001
                while perf_counter() < end:
                    pass
                answered.append(n)
                if n == 0:
                    first()

            return handle

        self.db.write(lambda c: None)  # goes alone: the others wait, and group
        return [self.db.write(lambda c: None).addCallback(handler(n)) for n in range(count)]

    @inlineCallbacks
    def test_aCommittedGroupLetsTheReactorIn(self):
        """
        The callers of a committed group whose answers take long are
        answered in order over several turns of the reactor, so that a
        timer (another request, a delivery) gets in between.
        """
        answered, between = [], []
        writes = self.slowAnswers(
            30, answered, lambda: reactor.callLater(0, lambda: between.append(len(answered)))
        )
        yield gatherResults(writes)
        self.assertEqual(answered, list(range(30)))
        self.assertEqual(len(between), 1)
        self.assertLess(between[0], 30)

    @inlineCallbacks
    def test_closeWaitsForEveryAnswer(self):
        """
        close() asked for while a committed group is being answered fires
        once every caller of the group has its answer.
        """
        answered, closed = [], []
        writes = self.slowAnswers(
            30, answered, lambda: self.db.close().addCallback(lambda _: closed.append(len(answered)))
        )
        yield gatherResults(writes)
        while not closed:
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(closed, [30])

    @inlineCallbacks
    def test_failingWriteDoesNotUndoItsGroup(self):
        def insert(cursor, n):
            cursor.execute("INSERT INTO sessions (id, created) VALUES (?, 0)", (n,))

        def broken(cursor):
            cursor.execute("INSERT INTO sessions (id, created) VALUES ('bad', 0)")
            raise ValueError("fails after writing")

        first = self.db.write(insert, "a")
        failing = self.db.write(broken)
        last = self.db.write(insert, "b")
        yield first
        yield self.assertFailure(failing, ValueError)
        yield last
        ids = yield self.db.read(
            lambda c: sorted(r[0] for r in c.execute("SELECT id FROM sessions").fetchall())
        )
        self.assertEqual(ids, ["a", "b"])

    @inlineCallbacks
    def test_aRefusalDoesNotRunItsGroupAgain(self):
        """
        An operation that refuses (a L{Refusal}, before writing) fails
        alone, and the others of its group run once: a client that asks
        for what does not exist cannot make every group run twice.
        """
        runs = []

        def insert(cursor, n):
            runs.append(n)
            cursor.execute("INSERT INTO sessions (id, created) VALUES (?, 0)", (n,))

        def refuse(cursor):
            raise UnknownMessage(999)

        # Held on the writer thread: the three writes make one group.
        gate = threading.Event()
        held = self.db.write(lambda cursor: gate.wait(10))
        first = self.db.write(insert, "a")
        refused = self.db.write(refuse)
        last = self.db.write(insert, "b")
        gate.set()
        yield held
        yield first
        yield self.assertFailure(refused, UnknownMessage)
        yield last
        self.assertEqual(runs, ["a", "b"])
        ids = yield self.db.read(
            lambda c: sorted(r[0] for r in c.execute("SELECT id FROM sessions").fetchall())
        )
        self.assertEqual(ids, ["a", "b"])

    @inlineCallbacks
    def test_neverOnTheReactorThread(self):
        threads = []
        yield self.db.write(lambda c: threads.append(threading.current_thread()))
        yield self.db.read(lambda c: threads.append(threading.current_thread()))
        self.assertNotIn(threading.main_thread(), threads)

    @inlineCallbacks
    def test_walMode(self):
        mode = yield self.db.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
        self.assertEqual(mode, "wal")


class JournalTests(StorageTestCase):
    @inlineCallbacks
    def test_appendIsDurable(self):
        """
        An appended message is there for a new connection, and pending()
        lists pending ones in order.
        """
        journal = SQLiteJournal(self.db)
        first = yield journal.append("ci", "one", 1.0)
        second = yield journal.append("ci", "two", 2.0)
        self.assertLess(first.id, second.id)
        with sqlite3.connect(self.path) as other:
            rows = other.execute("SELECT content FROM queue ORDER BY id").fetchall()
        self.assertEqual(rows, [("one",), ("two",)])
        yield journal.markDelivered(first.id)
        pending = yield journal.pending()
        self.assertEqual([m.content for m in pending], ["two"])

    @inlineCallbacks
    def test_failuresAndDeadLetters(self):
        journal = SQLiteJournal(self.db)
        m = yield journal.append("ci", "x", 1.0)
        once = yield journal.recordFailure(m.id, "RuntimeError: no", False)
        self.assertEqual((once.attempts, once.state), (1, "pending"))
        dead = yield journal.recordFailure(m.id, "RuntimeError: still no", True)
        self.assertEqual((dead.attempts, dead.state, dead.lastError), (2, FAILED, "RuntimeError: still no"))
        self.assertEqual((yield journal.pending()), [])
        kept = yield journal.messages("ci")
        self.assertEqual([k.content for k in kept], ["x"])

    @inlineCallbacks
    def test_survivesReopen(self):
        journal = SQLiteJournal(self.db)
        yield journal.append("ci", "kept", 1.0)
        delivered = yield journal.append("ci", "done", 1.0)
        yield journal.markDelivered(delivered.id)
        yield self.reopen()
        pending = yield SQLiteJournal(self.db).pending()
        self.assertEqual([(m.session, m.content) for m in pending], [("ci", "kept")])
        self.assertNotEqual(DELIVERED, pending[0].state)


class LocalBackendTests(StorageTestCase):
    @inlineCallbacks
    def test_deliveryCreatesSessionAndRecordsMessage(self):
        backend = LocalBackend(self.db, reactor)
        self.assertEqual((yield backend.listSessions()), [])
        yield backend.deliver(Delivery(1, "ci", "Build completed successfully!", 1700000000.0))
        self.assertEqual((yield backend.listSessions()), ["ci"])
        session = yield backend.getSession("ci")
        self.assertEqual([(m.role, m.content, m.created) for m in session.messages],
                         [("user", "Build completed successfully!", 1700000000.0)])
        self.assertIsNone((yield backend.getSession("nope")))

    @inlineCallbacks
    def test_listsEverySessionSortedOnce(self):
        """
        Sessions are listed each once, in order, whatever their ids hold
        (spaces, commas, non-ASCII).
        """
        backend = LocalBackend(self.db, reactor)
        ids = ["zeta", "a b, c", "\u00e9t\u00e9", "2024-01-15-10-30-00", "\U0001f600"]
        for n, sessionId in enumerate(ids + ["zeta"]):
            yield backend.deliver(Delivery(n + 1, sessionId, "x", 1700000000.0))
        self.assertEqual((yield backend.listSessions()), sorted(ids))

    @inlineCallbacks
    def test_listSeesEveryChange(self):
        """
        The list is read again after any change: a delivery, a deleted
        session, and a session written by another connection (another
        process on the same file).
        """
        backend = LocalBackend(self.db, reactor)
        yield backend.deliver(Delivery(1, "a", "x", 1700000000.0))
        for _ in range(3):  # each reader connection
            self.assertEqual((yield backend.listSessions()), ["a"])
        yield backend.deliver(Delivery(2, "b", "x", 1700000000.0))
        for _ in range(3):
            self.assertEqual((yield backend.listSessions()), ["a", "b"])
        yield backend.deleteSession("a")
        for _ in range(3):
            self.assertEqual((yield backend.listSessions()), ["b"])
        self.writeElsewhere("INSERT INTO sessions (id, created) VALUES ('c', 0)")
        for _ in range(3):
            self.assertEqual((yield backend.listSessions()), ["b", "c"])

    @inlineCallbacks
    def test_sessionReadAgainSeesEveryChange(self):
        """
        A session read again (its messages parsed once) is the same as one
        read by a fresh backend, and shows every change: a deleted
        message, a replaced session, a cleared one.
        """
        backend = LocalBackend(self.db, reactor)
        for n in range(3):
            yield backend.deliver(Delivery(n + 1, "s", f"m{n}", 1700000000.0 + n))
        yield backend.updateSession("s", "title", "T")
        first = yield backend.getSession("s")
        self.assertEqual((yield backend.getSession("s")), first)
        self.assertEqual((yield LocalBackend(self.db, reactor).getSession("s")), first)
        self.assertEqual((first.title, [m.content for m in first.messages]),
                         ("T", ["m0", "m1", "m2"]))

        def contents(session):
            return [m.content for m in session.messages]

        yield backend.deleteMessage("s", 0)
        self.assertEqual(contents((yield backend.getSession("s"))), ["m1", "m2"])
        yield backend.deliver(Delivery(4, "s", "m3", 1700000003.0))
        self.assertEqual(contents((yield backend.getSession("s"))), ["m1", "m2", "m3"])
        yield backend.importSession(
            Session(id="s", messages=(Message(role="user", content="new"),)), replace=True
        )
        self.assertEqual(contents((yield backend.getSession("s"))), ["new"])
        yield backend.clearSession("s")
        self.assertEqual(contents((yield backend.getSession("s"))), [])

    @inlineCallbacks
    def test_parsedMessagesAreBounded(self):
        """
        The parsed messages kept are forgotten past a size; reads stay
        right across it.
        """
        import chatweb.backends.local

        self.patch(chatweb.backends.local, "PARSED_MESSAGES_SIZE", 200)
        backend = LocalBackend(self.db, reactor)
        for n in range(20):
            yield backend.deliver(Delivery(n + 1, "s", f"message {n}", 1700000000.0))
        for _ in range(2):
            session = yield backend.getSession("s")
            self.assertEqual([m.content for m in session.messages],
                             [f"message {n}" for n in range(20)])
            self.assertLess(len(backend._parsed), 20)

    @inlineCallbacks
    def test_pageOfALongSession(self):
        """
        The part of a session a page reads holds the messages around the
        page's end, and the count and token usage of the whole session
        (a message that only mentions "usage" counts for none).
        """
        messages = []
        for n in range(250):
            if n % 3 == 2:
                usage = {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1}
                messages.append(Message(role="assistant", content=f"a{n}", usage=usage))
            else:
                messages.append(Message(role="user", content=f'u{n} "usage" {{}}'))
        backend = LocalBackend(self.db, reactor)
        yield backend.importSession(
            Session(id="s", title="T", model="m", messages=tuple(messages))
        )
        whole = yield backend.getSession("s")
        self.assertEqual(len(whole.messages), 250)
        for before, first, last in [(None, 150, 250), (250, 150, 250), (999, 150, 250),
                                    (200, 100, 250), (130, 30, 230), (37, 0, 137),
                                    (0, 0, 100)]:
            page = yield backend.getSessionPage("s", before, 100)
            self.assertEqual((page.first, page.total), (first, 250), before)
            self.assertEqual(page.session.messages, whole.messages[first:last], before)
            self.assertEqual(page.usage, whole.totalUsage())
            self.assertEqual(page.session.metadata(), whole.metadata())
        self.assertIsNone((yield backend.getSessionPage("nope", None, 100)))
        yield backend.createSession()
        empty = yield backend.getSessionPage((yield backend.listSessions())[0], None, 100)
        self.assertEqual((empty.session.messages, empty.first, empty.total), ((), 0, 0))

    @inlineCallbacks
    def test_redeliveryIsIgnored(self):
        """
        The same delivery id twice (a crash between delivery and its record)
        leaves one message.
        """
        backend = LocalBackend(self.db, reactor, EchoResponder(reactor))
        yield backend.deliver(Delivery(7, "ci", "once", 1.0))
        yield backend.deliver(Delivery(7, "ci", "once", 1.0))
        session = yield backend.getSession("ci")
        self.assertEqual([(m.role, m.content) for m in session.messages],
                         [("user", "once"), ("assistant", "once")])

    @inlineCallbacks
    def test_busyWhileDeliveringThenIdle(self):
        backend = LocalBackend(self.db, reactor)
        self.assertTrue((yield backend.whenIdle("ci")) is None)
        d = backend.deliver(Delivery(1, "ci", "x", 1.0))
        self.assertTrue(backend.isBusy("ci"))
        self.assertFalse(backend.isBusy("other"))
        idle = backend.whenIdle("ci")
        yield d
        yield idle
        self.assertFalse(backend.isBusy("ci"))

    @inlineCallbacks
    def test_unicodeAndOddContentRoundTrip(self):
        backend = LocalBackend(self.db, reactor)
        text = "日本語 \x00 nul, émoji 🎉, <b>tags</b>, \"quotes\""
        yield backend.deliver(Delivery(1, "セッション", text, 1.0))
        session = yield backend.getSession("セッション")
        self.assertEqual(session.messages[0].content, text)

    @inlineCallbacks
    def test_createSessionUsesTimestampIds(self):
        backend = LocalBackend(self.db, reactor)
        first = yield backend.createSession(provider="deepseek", cwd="/tmp")
        second = yield backend.createSession()
        self.assertRegex(first, r"^\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d$")
        self.assertNotEqual(first, second)
        self.assertTrue(second.startswith(first[:13]))
        session = yield backend.getSession(first)
        self.assertEqual((session.provider, session.cwd), ("deepseek", "/tmp"))
        self.assertEqual(sessionIdFor(0)[:4], "1970")


class IdempotencyJournalTests(StorageTestCase):
    @inlineCallbacks
    def test_keyRememberedForADay(self):
        from chatweb.errors import IdempotencyConflict

        journal = SQLiteJournal(self.db)
        first = yield journal.append("ci", "x", 1000.0, "k")
        again = yield journal.append("ci", "x", 1000.0 + 86399, "k")
        self.assertEqual((again.id, again.duplicate), (first.id, True))
        yield self.assertFailure(journal.append("other", "x", 1001.0, "k"), IdempotencyConflict)
        yield self.assertFailure(journal.append("ci", "y", 1001.0, "k"), IdempotencyConflict)
        later = yield journal.append("ci", "x", 1000.0 + 86401, "k")
        self.assertNotEqual(later.id, first.id)
        self.assertFalse(later.duplicate)
        pending = yield journal.pending()
        self.assertEqual([m.id for m in pending], [first.id, later.id])


class LifecycleTests(TestCase):
    """
    What a closed or broken database does: every call fails at once, and
    no error is left unhandled in a Deferred.
    """

    def test_everyCallAfterCloseFailsAtOnce(self) -> None:
        from chatweb.store._sqlite import DatabaseClosed

        db = SQLiteDatabase(self.mktemp() + ".sqlite3", reactor)
        opened = db.open(JOURNAL_SCHEMA)
        closed = db.close()
        self.failureResultOf(db.read(lambda c: 1), DatabaseClosed)
        self.failureResultOf(db.write(lambda c: 1), DatabaseClosed)
        self.failureResultOf(db.open(JOURNAL_SCHEMA), DatabaseClosed)
        return gatherResults([opened.addErrback(lambda f: f.trap(DatabaseClosed)), closed])

    @inlineCallbacks
    def test_readAfterCloseOfAnOpenDatabase(self):
        from chatweb.store._sqlite import DatabaseClosed

        db = SQLiteDatabase(self.mktemp() + ".sqlite3", reactor)
        yield db.open(JOURNAL_SCHEMA)
        reading = db.read(lambda c: c.execute("SELECT 1").fetchone()[0])
        yield db.close()
        # A read asked for before close finishes first.
        self.assertEqual((yield reading), 1)
        self.failureResultOf(db.read(lambda c: 1), DatabaseClosed)

    @inlineCallbacks
    def test_failedOpenLeavesNoUnhandledError(self):
        """
        A schema that cannot be created fails open() and the reads waiting
        for it; nothing is left for the garbage collector to log.
        """
        import gc

        db = SQLiteDatabase(self.mktemp() + ".sqlite3", reactor)
        self.addCleanup(db.close)
        opening = db.open(["CREATE TABLE broken (("])
        waiting = db.read(lambda c: 1)
        yield self.assertFailure(opening, sqlite3.OperationalError)
        yield self.assertFailure(waiting, sqlite3.OperationalError)
        yield self.assertFailure(db.read(lambda c: 1), sqlite3.OperationalError)
        del opening, waiting
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])


class PrivacyTests(TestCase):
    @inlineCallbacks
    def test_databaseFilesReadableByOwnerOnly(self):
        """
        In a data directory that already exists with a permissive umask, the
        database and its WAL files are created 0600.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory, mode=0o755)
        previous = os.umask(0o022)
        self.addCleanup(os.umask, previous)
        db = SQLiteDatabase(os.path.join(directory, "chatweb.sqlite3"), reactor)
        self.addCleanup(db.close)
        yield db.open(JOURNAL_SCHEMA)
        yield db.write(lambda c: c.execute("SELECT 1"))
        names = sorted(os.listdir(directory))
        self.assertIn("chatweb.sqlite3", names)
        for name in names:
            mode = os.stat(os.path.join(directory, name)).st_mode & 0o777
            self.assertEqual(mode, 0o600, name)

    def test_readableDataDirIsWarnedAbout(self) -> None:
        from chatweb.config import dataDirWarning

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        os.chmod(directory, 0o755)
        warning = dataDirWarning(directory)
        self.assertIsNotNone(warning)
        self.assertIn(f"chmod 700 {directory}", warning)
        os.chmod(directory, 0o700)
        self.assertIsNone(dataDirWarning(directory))
