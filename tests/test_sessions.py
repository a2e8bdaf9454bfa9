"""
The sessions read model: a session's data, its queued and failed messages
and what is in flight, from one place.
"""

from __future__ import annotations

import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from chatweb.queue import MessageQueue, RetryPolicy
from chatweb.sessions import Sessions, SessionView
from chatweb.testing import MemoryAdapter, MemoryJournal


class SessionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.journal = MemoryJournal()
        self.adapter = MemoryAdapter(autoComplete=False)
        self.queue = MessageQueue(
            self.journal,
            self.adapter,
            self.clock,
            retry=RetryPolicy(maxAttempts=1),
            rng=random.Random(1),
        )
        self.successResultOf(self.queue.start())
        self.sessions = Sessions(self.adapter, self.journal, self.queue)

    def test_unknownSession(self) -> None:
        self.assertIsNone(self.successResultOf(self.sessions.get("nope")))
        self.assertIsNone(self.successResultOf(self.sessions.messages("nope", 0)))

    def test_queuedFailedAndInFlight(self) -> None:
        """
        A session not created yet but with messages waiting is shown, empty,
        with them; the one being delivered is named; a dead letter is among
        the failed; once delivered, the session's messages are there.
        """
        first = self.successResultOf(self.queue.post("s", "one"))
        second = self.successResultOf(self.queue.post("s", "two"))
        view = self.successResultOf(self.sessions.get("s"))
        assert isinstance(view, SessionView)
        self.assertEqual(view.id, "s")
        self.assertEqual(view.session.messages, ())
        self.assertEqual([m.id for m in view.queued], [first.id, second.id])
        self.assertEqual((view.failed, view.inFlight), ((), first.id))
        self.adapter.failWaiting()
        view = self.successResultOf(self.sessions.get("s"))
        self.assertEqual([m.id for m in view.failed], [first.id])
        self.assertEqual([m.id for m in view.queued], [second.id])
        self.assertEqual(view.inFlight, second.id)
        self.adapter.complete()
        view = self.successResultOf(self.sessions.get("s"))
        self.assertEqual((view.queued, view.inFlight), ((), None))
        self.assertEqual([m.content for m in view.session.messages], ["two"])
        self.assertEqual(self.successResultOf(self.sessions.ids()), ["s"])

    def test_messagesSince(self) -> None:
        for text in ("a", "b", "c"):
            self.successResultOf(self.queue.post("s", text))
            self.adapter.complete()
        self.assertEqual(
            [m.content for m in self.successResultOf(self.sessions.messages("s", 1))],
            ["b", "c"],
        )
        self.assertEqual(len(self.successResultOf(self.sessions.messages("s", 0))), 3)
        self.assertEqual(self.successResultOf(self.sessions.messages("s", 5)), [])

    def test_deliveredBetweenReadsIsNotMissed(self) -> None:
        """
        A message delivered while a view is being read (between its read of
        the journal and its read of the session) is in the view: queued, or
        in the session, never in neither.
        """
        self.successResultOf(self.queue.post("s", "one"))
        reads: list[str] = []

        def delivering(read):  # type: ignore[no-untyped-def]
            def wrapped(*args):  # type: ignore[no-untyped-def]
                result = read(*args)
                reads.append(read.__name__)
                if len(reads) == 1:
                    # The delivery ends right after the first read.
                    self.adapter.complete()
                return result

            return wrapped

        self.patch(self.adapter, "getSession", delivering(self.adapter.getSession))
        self.patch(self.journal, "messages", delivering(self.journal.messages))
        view = self.successResultOf(self.sessions.get("s"))
        assert isinstance(view, SessionView)
        shown = [m.content for m in view.session.messages] + [m.content for m in view.queued]
        self.assertIn("one", shown)
        self.assertEqual(len(reads), 2)
