"""
The IJournal contract: one suite of what every journal promises, run against
each engine (the SQLite journal and the in-memory one of chatweb.testing).

A new storage engine adds a TestCase that mixes in L{JournalContractMixin}
and says how to make an empty journal (L{JournalContractMixin.makeJournal}).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from chatweb.store._sqlite import SQLiteDatabase
from chatweb.errors import IdempotencyConflict, UnknownMessage, WrongState
from chatweb.interfaces import IJournal
from chatweb.store._journal import IDEMPOTENCY_WINDOW, SCHEMA, SQLiteJournal
from chatweb.model import DELIVERED, DISCARDED, FAILED, PENDING
from chatweb.testing import MemoryJournal

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

    async def makeJournal(self) -> Any:
        """
        A new, empty journal (an L{IJournal}), closed if need be when the
        test ends.
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


class SQLiteJournalContractTests(JournalContractMixin, TestCase):
    async def makeJournal(self) -> IJournal:
        db = SQLiteDatabase(os.path.abspath(self.mktemp()) + ".sqlite3", reactor)
        self.addCleanup(db.close)
        await db.open(SCHEMA)
        return SQLiteJournal(db)


class MemoryJournalContractTests(JournalContractMixin, TestCase):
    async def makeJournal(self) -> IJournal:
        return MemoryJournal()
