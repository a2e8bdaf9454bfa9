"""
Live events: the EventHub, the events the queue and the local backend
publish, streamed text, and the sweep's pruning of old events.
"""

from __future__ import annotations

import os
import random

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatweb.backends.local import SCHEMA as SESSIONS_SCHEMA
from chatweb.backends.local import LocalBackend
from chatweb.backends.responders import EchoResponder
from chatweb.store._sqlite import SQLiteDatabase
from chatweb.events import EventHub
from chatweb.store._journal import SCHEMA as JOURNAL_SCHEMA
from chatweb.store._journal import SQLiteJournal
from chatweb.model import Delivery, Event, EventKind, Session
from chatweb.queue import MessageQueue, RetryPolicy
from chatweb.queue import _queue
from chatweb.testing import MemoryAdapter, MemoryJournal


def event(id: int, session: str = "s") -> Event:
    return Event(id, EventKind.MESSAGE_QUEUED, session, 0.0, {"message": id})


class EventHubTests(SynchronousTestCase):
    def test_subscribersGetTheirSessionsEvents(self) -> None:
        """
        A subscriber of one session gets that session's events; one of all
        sessions gets every event; after unsubscribing, none.
        """
        hub = EventHub()
        ofA: list[Event] = []
        every: list[Event] = []
        stop = hub.subscribe(ofA.append, session="a")
        hub.subscribe(every.append)
        hub.publish(event(1, "a"))
        hub.publish(event(2, "b"))
        stop()
        stop()
        hub.publish(event(3, "a"))
        self.assertEqual([e.id for e in ofA], [1])
        self.assertEqual([e.id for e in every], [1, 2, 3])

    def test_aFailingSubscriberIsLoggedAndOthersCarryOn(self) -> None:
        hub = EventHub()
        got: list[Event] = []
        logged: list[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)

        def broken(e: Event) -> None:
            raise ValueError("subscriber bug")

        hub.subscribe(broken)
        hub.subscribe(got.append)
        hub.publish(event(1))
        self.assertEqual([e.id for e in got], [1])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertTrue(any(e.get("id") == 1 for e in logged))


class QueueEventTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.hub = EventHub()
        self.got: list[Event] = []
        self.hub.subscribe(self.got.append)
        self.journal = MemoryJournal(now=self.clock.seconds, eventSink=self.hub.publish)
        self.adapter = MemoryAdapter(autoComplete=False)
        self.queue = MessageQueue(
            self.journal,
            self.adapter,
            self.clock,
            retry=RetryPolicy(maxAttempts=2, jitter=0),
            rng=random.Random(1),
        )
        self.successResultOf(self.queue.start())

    def kinds(self) -> list[tuple[str, int]]:
        return [(e.kind.value, e.data["message"]) for e in self.got]

    def test_deliveryEventsInOrder(self) -> None:
        """
        A posted message is queued, its delivery starts, streams text and
        is done; a failing one fails, is retried and becomes a dead letter;
        a discarded one says so.  Ids increase.
        """
        ok = self.successResultOf(self.queue.post("s", "one"))
        delivery = self.adapter.waiting[0][0]
        assert delivery.emit is not None
        delivery.emit("par")
        delivery.emit("tial")
        self.adapter.complete()
        bad = self.successResultOf(self.queue.post("s", "two"))
        self.adapter.setBusy("t")
        later = self.successResultOf(self.queue.post("t", "three"))
        self.adapter.failWaiting()
        self.clock.advance(1)
        self.adapter.failWaiting()
        self.successResultOf(self.queue.discard(later.id))
        self.assertEqual(
            self.kinds()[:6],
            [
                ("message.queued", ok.id),
                ("delivery.started", ok.id),
                ("delivery.text", ok.id),
                ("delivery.text", ok.id),
                ("delivery.done", ok.id),
                ("message.queued", bad.id),
            ],
        )
        self.assertEqual(
            [e.data["text"] for e in self.got if e.kind == EventKind.DELIVERY_TEXT],
            ["par", "tial"],
        )
        rest = self.kinds()[6:]
        self.assertEqual(
            [k for k in rest if k[1] == bad.id],
            [
                ("delivery.started", bad.id),
                ("delivery.failed", bad.id),
                ("delivery.started", bad.id),
                ("delivery.failed", bad.id),
            ],
        )
        self.assertEqual(rest[-1], ("message.discarded", later.id))
        finals = [e.data["final"] for e in self.got if e.kind == EventKind.DELIVERY_FAILED]
        self.assertEqual(finals, [False, True])
        ids = [e.id for e in self.got]
        self.assertEqual(ids, sorted(set(ids)))
        self.assertEqual(self.successResultOf(self.journal.eventsSince(0)), self.got)

    def test_eachOutcomeIsOneLogEventWithFieldsNotContent(self) -> None:
        """
        Queued, delivered, failed, dead-lettered and retried messages are
        each logged once with the session, message id, attempt (and
        duration when delivered or failed); never their content.
        """
        self.queue.logEachMessage = True
        logged: list[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        ok = self.successResultOf(self.queue.post("s", "secret-one"))
        self.clock.advance(3)
        self.adapter.complete()
        bad = self.successResultOf(self.queue.post("s", "secret-two"))
        self.adapter.failWaiting()
        self.clock.advance(1)
        self.adapter.failWaiting()
        self.successResultOf(self.queue.retry(bad.id))
        mine = [e for e in logged if e.get("id") in (ok.id, bad.id)]
        kinds = [(e["log_format"].split(" {")[0], e["id"]) for e in mine]
        self.assertEqual(
            [k[1] for k in kinds], [ok.id, ok.id, bad.id, bad.id, bad.id, bad.id]
        )
        for e in mine:
            self.assertEqual(e["session"], "s")
            self.assertIn("attempt", e)
        delivered = mine[1]
        self.assertEqual(delivered["duration"], 3)
        self.assertEqual(mine[4]["log_level"].name, "error")
        text = repr(mine)
        self.assertNotIn("secret", text)

    def test_messagesPastTheFirstLinesOfAMinuteSummarized(self) -> None:
        """
        By default the first messages of each minute are logged one by one
        (a user trying chatweb sees each), the rest only counted: the sweep
        logs how many, at most once a minute (not at all when none were).
        A failure is logged when it happens either way; content never.
        """
        self.patch(_queue, "EACH_MESSAGE_LINES", 2)
        logged: list[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        first = self.successResultOf(self.queue.post("s", "secret-one"))
        self.adapter.complete()
        self.assertEqual(
            [(e.get("id"), e["log_level"].name) for e in logged],
            [(first.id, "info"), (first.id, "info")],
        )
        logged.clear()
        second = self.successResultOf(self.queue.post("s", "secret-two"))
        self.adapter.complete()
        bad = self.successResultOf(self.queue.post("s", "secret-three"))
        self.adapter.failWaiting()
        self.assertEqual([(e.get("id"), e["log_level"].name) for e in logged],
                         [(bad.id, "warn")])
        logged.clear()
        self.clock.advance(55)
        self.assertEqual(logged, [])
        self.clock.advance(5)
        summaries = [e for e in logged if "queued" in e]
        self.assertEqual(
            [(e["queued"], e["delivered"], e["pending"]) for e in summaries],
            [(2, 1, 1)],
        )
        self.assertEqual(summaries[0]["log_level"].name, "info")
        self.assertNotIn("secret", repr(logged))
        self.assertNotIn(second.id, [e.get("id") for e in logged])
        logged.clear()
        self.clock.advance(60)
        self.assertEqual([e for e in logged if "queued" in e], [])
        # A new minute: its first messages are logged one by one again.
        third = self.successResultOf(self.queue.post("t", "secret-four"))
        self.assertIn(third.id, [e.get("id") for e in logged])

    def test_sweepPrunesOldEvents(self) -> None:
        """
        Events older than the retention are forgotten by the sweep; newer
        ones are kept.
        """
        self.queue.eventRetention = 100
        self.successResultOf(self.journal.logEvent(EventKind.SESSION_CHANGED, "old"))
        self.clock.advance(90)
        self.successResultOf(self.journal.logEvent(EventKind.SESSION_CHANGED, "new"))
        # The sweep (every 5 s) prunes at most once a minute.
        for _ in range(14):
            self.clock.advance(5)
        kept = self.successResultOf(self.journal.eventsSince(0))
        self.assertEqual([e.session for e in kept], ["new"])


class LocalBackendEventTests(TestCase):
    async def test_sessionCreatedAndMessagesAdded(self) -> None:
        """
        The local backend publishes session.created for a new session and
        message.added for the delivered message and each answer, all kept
        in the event log.
        """
        db = SQLiteDatabase(os.path.abspath(self.mktemp()) + ".sqlite3", reactor)
        self.addCleanup(db.close)
        await db.open(JOURNAL_SCHEMA + SESSIONS_SCHEMA)
        got: list[Event] = []
        backend = LocalBackend(db, reactor, EchoResponder(reactor), eventSink=got.append)
        await backend.deliver(Delivery(7, "s", "hi", 1.0))
        await backend.deliver(Delivery(8, "s", "again", 2.0))
        self.assertEqual(
            [(e.kind.value, e.data.get("delivery")) for e in got],
            [
                ("session.created", None),
                ("message.added", 7),
                ("message.added", 7),
                ("message.added", 8),
                ("message.added", 8),
            ],
        )
        self.assertEqual(got[1].data["message"]["content"], "hi")
        self.assertEqual(got[2].data["message"]["role"], "assistant")
        self.assertEqual(await SQLiteJournal(db).eventsSince(0), got)

    async def test_createdAndImportedSessions(self) -> None:
        db = SQLiteDatabase(os.path.abspath(self.mktemp()) + ".sqlite3", reactor)
        self.addCleanup(db.close)
        await db.open(JOURNAL_SCHEMA + SESSIONS_SCHEMA)
        got: list[Event] = []
        backend = LocalBackend(db, reactor, eventSink=got.append)
        made = await backend.createSession(model="m")
        self.assertTrue(await backend.importSession(Session(id="imported")))
        self.assertFalse(await backend.importSession(Session(id="imported")))
        self.assertTrue(await backend.importSession(Session(id="imported"), replace=True))
        self.assertEqual(
            [(e.kind.value, e.session) for e in got],
            [
                ("session.created", made),
                ("session.created", "imported"),
                ("session.changed", "imported"),
            ],
        )
