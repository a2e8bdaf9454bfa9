"""
A message to a session with nothing pending, for the default backend with
no responder: stored and delivered in one write (the journal's
C{appendRecorded}), with the same order, events and atomicity as the
four writes it replaces.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from chatweb.backends.local import SCHEMA as SESSIONS_SCHEMA
from chatweb.backends.local import LocalBackend
from chatweb.backends.responders import EchoResponder
from chatweb.errors import UnknownMessage
from chatweb.events import EventHub
from chatweb.model import DELIVERED, Delivery
from chatweb.queue import MessageQueue
from chatweb.service import ChatWebService
from chatweb.store._journal import SCHEMA as JOURNAL_SCHEMA
from chatweb.store._journal import SQLiteJournal
from chatweb.store._sqlite import SQLiteDatabase
from chatweb.testing import MemoryAdapter


class RecordedTestCase(TestCase):
    schema = JOURNAL_SCHEMA + SESSIONS_SCHEMA

    def makeDatabase(self) -> Any:
        return SQLiteDatabase(self.mktemp() + ".sqlite3", reactor)

    def setUp(self) -> Deferred[None]:
        self.db = self.makeDatabase()
        self.addCleanup(self.db.close)
        self.hub = EventHub()
        self.events: list[Any] = []
        self.hub.subscribe(self.events.append)
        self.journal = SQLiteJournal(self.db, now=reactor.seconds, eventSink=self.hub.publish)
        return self.db.open(self.schema)

    def startQueue(self, adapter: Any, recorder: Any) -> Deferred[MessageQueue]:
        """
        A queue for C{adapter}, once it has read what the journal holds.
        """
        queue = MessageQueue(self.journal, adapter, reactor, recorder=recorder)
        self.addCleanup(queue.stop)
        return queue.start().addCallback(lambda _: queue)

    def holdWriter(self) -> threading.Event:
        """
        Keep the writer thread busy until the returned event is set: the
        writes asked for meanwhile wait, and then commit together, in
        order.
        """
        gate = threading.Event()
        self.db.write(lambda cursor: gate.wait(10))
        self.addCleanup(gate.set)
        return gate

    def backend(self, **kwargs: Any) -> LocalBackend:
        backend = LocalBackend(self.db, reactor, eventSink=self.hub.publish, **kwargs)
        self.delivered: list[Delivery] = []
        deliver = backend.deliver

        def spy(delivery: Delivery) -> Deferred[None]:
            self.delivered.append(delivery)
            return deliver(delivery)

        backend.deliver = spy  # type: ignore[method-assign]
        return backend

    def contents(self, backend: LocalBackend, session: str) -> Deferred[list[Any]]:
        return backend.getSession(session).addCallback(
            lambda s: [m.content for m in s.messages] if s is not None else None
        )


class RecordedTests(RecordedTestCase):
    async def test_idleSessionDeliveredInTheWriteThatStoresIt(self) -> None:
        """
        The message is in its session, delivered, once the post fires; the
        event log says what four writes would have said, in order.
        """
        backend = self.backend()
        queue = await self.startQueue(backend, backend.recorder)
        message = await queue.post("s", "hello")
        self.assertEqual(message.state, DELIVERED)
        self.assertEqual((await self.contents(backend, "s")), ["hello"])
        self.assertEqual((await self.journal.messages("s")), [])
        # Not handed over a second time.
        self.assertEqual(self.delivered, [])
        kinds = [(e.kind.value, e.data.get("message")) for e in self.events]
        self.assertEqual(
            kinds,
            [
                ("message.queued", message.id),
                ("delivery.started", message.id),
                ("session.created", None),
                ("message.added", {"role": "user", "content": "hello",
                                   "created": message.received}),
                ("delivery.done", message.id),
            ],
        )
        self.assertEqual([e.id for e in self.events], sorted(e.id for e in self.events))
        self.assertEqual(self.events[1].data["attempt"], 1)
        history = await self.journal.messageHistory(message.id)
        self.assertEqual(history[0].state, DELIVERED)
        self.assertEqual(
            [e.kind.value for e in history[1]],
            ["message.queued", "delivery.started", "delivery.done"],
        )

    async def test_loggedAsQueuedAndDelivered(self) -> None:
        """
        The log says of such a message what it says of any: queued, then
        delivered (a new user watching twistd's output sees both), with its
        session and id, not its content.
        """
        backend = self.backend()
        queue = await self.startQueue(backend, backend.recorder)
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        message = await queue.post("s", "secret")
        mine = [e for e in logged if e.get("id") == message.id]
        self.assertEqual(
            [(e["log_format"].split(" {")[0], e["session"], e["attempt"]) for e in mine],
            [("Message", "s", 0), ("Message", "s", 1)],
        )
        self.assertIn("queued", mine[0]["log_format"])
        self.assertIn("delivered", mine[1]["log_format"])
        self.assertNotIn("secret", repr(mine))

    async def test_postsInFlightTogetherKeepTheirOrder(self) -> None:
        backend = self.backend()
        queue = await self.startQueue(backend, backend.recorder)
        gate = self.holdWriter()
        posts = [queue.post("s", f"m{n}") for n in range(5)]
        gate.set()
        await gatherResults(posts)
        self.assertEqual((await self.contents(backend, "s")), [f"m{n}" for n in range(5)])

    async def test_aMessageStoredTheUsualWayIsNotOvertaken(self) -> None:
        """
        A message posted while the session was busy is stored to be
        delivered later; one posted after it, when the session is idle
        again but the first is not stored yet, must not be delivered
        first.
        """
        adapter = MemoryAdapter()
        recorded: list[str] = []

        def record(cursor: Any, delivery: Delivery, now: float) -> list[Any]:
            recorded.append(delivery.content)
            return []

        def deliver(delivery: Delivery) -> Deferred[None]:
            recorded.append(delivery.content)
            return original(delivery)

        original = adapter.deliver
        adapter.deliver = deliver  # type: ignore[method-assign]
        queue = await self.startQueue(adapter, lambda: record)
        gate = self.holdWriter()
        adapter.setBusy("s")
        first = queue.post("s", "first")
        adapter.setBusy("s", False)
        second = queue.post("s", "second")
        gate.set()
        await gatherResults([first, second])
        await queue.whenDelivered()
        self.assertEqual(recorded, ["first", "second"])

    async def test_aMessageQueuedAgainGoesFirst(self) -> None:
        """
        A failed message queued again by hand (POST /queue/{id}/retry)
        keeps its place by id: a message posted while that is being
        written is delivered after it.
        """
        failed = await self.journal.append("s", "failed", reactor.seconds())
        await self.journal.recordFailure(failed.id, "boom", True)
        backend = self.backend()
        queue = await self.startQueue(backend, backend.recorder)
        gate = self.holdWriter()
        retried = queue.retry(failed.id)
        posted = queue.post("s", "newer")
        gate.set()
        await gatherResults([retried, posted])
        await queue.whenDelivered()
        self.assertEqual((await self.contents(backend, "s")), ["failed", "newer"])

    async def test_aFailingOperationInTheGroup(self) -> None:
        """
        A refused operation in the same group (a discard of no message)
        fails alone: the messages stored and delivered beside it are, and
        the events published are those committed, in order, once each.
        """
        backend = self.backend()
        queue = await self.startQueue(backend, backend.recorder)
        gate = self.holdWriter()
        first = queue.post("s", "A")
        refused = queue.discard(999)
        second = queue.post("t", "B")
        gate.set()
        await self.assertFailure(refused, UnknownMessage)
        await gatherResults([first, second])
        self.assertEqual((await self.contents(backend, "s")), ["A"])
        self.assertEqual((await self.contents(backend, "t")), ["B"])
        committed = await self.journal.eventsSince(0)
        self.assertEqual(
            [(e.id, e.kind, e.data) for e in self.events],
            [(e.id, e.kind, e.data) for e in committed],
        )

    async def test_pendingMessagesGoFirst(self) -> None:
        """
        Messages already waiting for a session (stored before a restart)
        are delivered before one posted now.
        """
        await self.journal.append("s", "older", reactor.seconds())
        backend = self.backend()
        queue = await self.startQueue(backend, backend.recorder)
        await queue.post("s", "newer")
        await queue.whenDelivered()
        self.assertEqual((await self.contents(backend, "s")), ["older", "newer"])

    async def test_aRepeatedIdempotencyKeyStoresOnce(self) -> None:
        backend = self.backend()
        queue = await self.startQueue(backend, backend.recorder)
        first = await queue.post("s", "once", "key-1")
        again = await queue.post("s", "once", "key-1")
        self.assertEqual(again.id, first.id)
        self.assertTrue(again.duplicate)
        self.assertEqual((await self.contents(backend, "s")), ["once"])
        # Nor delivered twice, as the event log tells subscribers.
        kinds = [e.kind.value for e in self.events]
        self.assertEqual((kinds.count("message.queued"), kinds.count("delivery.done")), (1, 1))

    async def test_aFailedRecordStoresNothing(self) -> None:
        """
        The message and its delivery are one transaction: when recording
        fails, the post fails and neither is kept; the next post works.
        """
        backend = self.backend()
        calls = []

        def broken(cursor: Any, delivery: Delivery, now: float) -> list[Any]:
            calls.append(delivery)
            cursor.execute("INSERT INTO sessions (id, created) VALUES ('half', 0)")
            raise RuntimeError("disk on fire")

        queue = await self.startQueue(backend, lambda: broken if not calls else backend.recorder())
        await self.assertFailure(queue.post("s", "lost"), RuntimeError)
        self.assertEqual((await self.journal.messages("s")), [])
        self.assertEqual((await backend.listSessions()), [])
        await queue.post("s", "kept")
        self.assertEqual((await self.contents(backend, "s")), ["kept"])

    async def test_aResponderAnswersEachMessage(self) -> None:
        """
        With a responder, delivering is more than recording: each message
        is handed over and answered, as before.
        """
        backend = self.backend(responder=EchoResponder(reactor))
        self.assertIsNone(backend.recorder())
        queue = await self.startQueue(backend, backend.recorder)
        await queue.post("s", "ping")
        await queue.whenDelivered()
        self.assertEqual([d.content for d in self.delivered], ["ping"])
        self.assertEqual(len((await self.contents(backend, "s"))), 2)


class ProgramsOwnBackendTests(TestCase):
    async def test_deliveredToTheBackendAProgramPasses(self) -> None:
        """
        A program that passes a L{LocalBackend} of its own (on a database of
        its own) gets every message in it: the write that stores a message
        cannot deliver it there.
        """
        dataDir = os.path.abspath(self.mktemp())
        os.makedirs(dataDir)
        # The data dir once served the default backend: its tables exist.
        first = ChatWebService(apiKeys=["k" * 32], dataDir=dataDir, endpoint=None)
        first.startService()
        await first.ready
        await first.stopService()
        theirs = SQLiteDatabase(os.path.join(dataDir, "theirs.sqlite3"), reactor)
        self.addCleanup(theirs.close)
        await theirs.open(SESSIONS_SCHEMA)
        backend = LocalBackend(theirs, reactor)
        service = ChatWebService(
            apiKeys=["k" * 32], dataDir=dataDir, endpoint=None, adapter=backend
        )
        service.startService()
        self.addCleanup(service.stopService)
        await service.ready
        await service.queue.post("s", "hello")
        await service.queue.whenDelivered()
        session = await backend.getSession("s")
        self.assertEqual([m.content for m in session.messages], ["hello"])

