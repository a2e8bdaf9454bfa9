"""
The queue's promises, driven by a Clock: FIFO per session, one delivery in
flight per session, immediate delivery when idle and on the idle Deferred,
the sweep, retries and dead letters.
"""

from __future__ import annotations

import random

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from chatweb.errors import IdempotencyConflict, QueueFull, UnknownMessage, WrongState
from chatweb.model import FAILED, Delivery
from chatweb.queue import MessageQueue, RetryPolicy
from chatweb.testing import MemoryAdapter, MemoryJournal

from .journals import HeldJournal


class QueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.journal = MemoryJournal()
        self.adapter = MemoryAdapter()
        self.queue = self.makeQueue()

    def makeQueue(self, **kwargs: object) -> MessageQueue:
        kwargs.setdefault("rng", random.Random(1))
        return MessageQueue(self.journal, self.adapter, self.clock, **kwargs)

    def start(self) -> None:
        self.successResultOf(self.queue.start())

    def post(self, session: str, content: str) -> None:
        self.successResultOf(self.queue.post(session, content))

    def test_postStoresBeforeAnswering(self) -> None:
        """
        post() fires only once the journal has stored the message: not
        while the append is under way.
        """
        self.journal = HeldJournal()
        self.queue = self.makeQueue()
        self.start()
        posted = self.queue.post("ci", "hello")
        self.assertNoResult(posted)
        self.assertEqual((self.journal.rows, self.adapter.delivered), ({}, []))
        self.journal.release()
        message = self.successResultOf(posted)
        self.assertEqual(self.journal.rows[message.id].content, "hello")
        self.assertEqual(self.adapter.contents("ci"), ["hello"])

    def test_storageFailureFailsThePost(self) -> None:
        self.start()
        self.journal.failAppends = True
        self.failureResultOf(self.queue.post("ci", "hello"), OSError)
        self.assertEqual(self.adapter.delivered, [])

    def test_deliveredAtOnceWhenIdle(self) -> None:
        self.start()
        self.post("ci", "one")
        self.assertEqual(self.adapter.contents("ci"), ["one"])
        self.assertEqual(self.successResultOf(self.queue.pendingFor("ci")), [])

    def test_idleSessionDeliveredWithoutReadingBack(self) -> None:
        """
        A message posted to a session with nothing else pending is
        delivered as stored, without reading it back from the journal;
        one posted behind another is read back once that one is done.
        """
        reads: list[tuple[str, int]] = []
        original = self.journal.nextPending

        def counted(session: str, afterId: int = 0) -> Deferred:
            reads.append((session, afterId))
            return original(session, afterId)

        self.journal.nextPending = counted  # type: ignore[method-assign]
        self.adapter.autoComplete = False
        self.start()
        self.post("ci", "one")
        self.assertEqual(([d.content for d, _ in self.adapter.waiting], reads), (["one"], []))
        self.post("ci", "two")
        self.adapter.complete()
        self.assertEqual([d.content for d, _ in self.adapter.waiting], ["two"])
        self.assertEqual(reads, [("ci", 0)])
        self.adapter.complete()
        self.assertEqual(self.adapter.contents("ci"), ["one", "two"])

    def test_fifoPerSessionOneInFlight(self) -> None:
        """
        While a delivery is under way, later messages of its session wait;
        they go in order, one at a time.
        """
        self.adapter.autoComplete = False
        self.start()
        for n in range(3):
            self.post("ci", f"m{n}")
        self.assertEqual([d.content for d, _ in self.adapter.waiting], ["m0"])
        self.adapter.complete()
        self.assertEqual([d.content for d, _ in self.adapter.waiting], ["m1"])
        self.adapter.complete()
        self.adapter.complete()
        self.assertEqual(self.adapter.contents("ci"), ["m0", "m1", "m2"])
        self.assertEqual(self.adapter.waiting, [])

    def test_busySessionHoldsItsMessagesWhileOthersFlow(self) -> None:
        self.start()
        self.adapter.setBusy("busy")
        self.post("busy", "held")
        self.post("free", "goes")
        self.assertEqual(self.adapter.contents("free"), ["goes"])
        self.assertEqual(self.adapter.contents("busy"), [])
        self.assertEqual([m.content for m in self.successResultOf(self.queue.pendingFor("busy"))], ["held"])

    def test_deliveredWhenAdapterReportsIdle(self) -> None:
        """
        The idle Deferred triggers delivery at once: no waiting for a sweep.
        """
        self.start()
        self.adapter.setBusy("ci")
        self.post("ci", "a")
        self.post("ci", "b")
        self.assertEqual(self.adapter.delivered, [])
        self.adapter.setBusy("ci", False)
        self.assertEqual(self.adapter.contents("ci"), ["a", "b"])
        self.assertEqual(self.clock.seconds(), 0)

    def test_sweepDeliversWhatIdleNeverAnnounced(self) -> None:
        """
        An adapter that becomes idle without firing its Deferred is caught
        by the sweep, at the configured interval.
        """
        self.queue = self.makeQueue(interval=5.0)
        self.start()
        self.adapter.setBusy("ci")
        self.post("ci", "late")
        self.adapter._busy.discard("ci")  # idle, but nobody is told
        self.clock.advance(4.9)
        self.assertEqual(self.adapter.delivered, [])
        self.clock.advance(0.1)
        self.assertEqual(self.adapter.contents("ci"), ["late"])

    def test_idleThatIsNotIdleDoesNotSpin(self) -> None:
        """
        An adapter whose whenIdle() fires at once while isBusy() still says
        busy does not trap the queue in a loop; the sweep delivers later.
        """
        self.start()
        self.adapter.setBusy("ci")
        self.adapter.whenIdle = lambda session: succeed(None)  # type: ignore[method-assign]
        self.post("ci", "x")
        self.assertEqual(self.adapter.delivered, [])
        self.adapter._busy.discard("ci")
        self.clock.advance(5)
        self.assertEqual(self.adapter.contents("ci"), ["x"])

    def test_sweepSurvivesAFailingSession(self) -> None:
        """
        A session whose adapter raises does not stop the sweep, nor the
        delivery to other sessions.
        """
        self.start()
        self.adapter.setBusy("bad")
        self.adapter.setBusy("good")
        self.post("bad", "x")
        self.post("good", "y")
        self.adapter._busy.clear()
        original = self.adapter.isBusy

        def isBusy(session: str) -> bool:
            if session == "bad":
                raise RuntimeError("adapter bug")
            return original(session)

        self.adapter.isBusy = isBusy  # type: ignore[method-assign]
        self.clock.advance(5)
        self.assertEqual(self.adapter.contents("good"), ["y"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.adapter.isBusy = original  # type: ignore[method-assign]
        self.clock.advance(5)
        self.assertEqual(self.adapter.contents("bad"), ["x"])

    def test_pendingDeliveredOnStart(self) -> None:
        """
        What the journal holds from before is delivered on start, in order.
        """
        for n in range(3):
            self.journal.append("ci", f"old{n}", 0)
        self.journal.append("other", "x", 0)
        self.start()
        self.assertEqual(self.adapter.contents("ci"), ["old0", "old1", "old2"])
        self.assertEqual(self.adapter.contents("other"), ["x"])

    def test_postedBeforeLoadKeepsOrder(self) -> None:
        """
        A message posted while the journal is still being read goes after
        the older pending ones.
        """
        self.journal.append("ci", "old", 0)
        loading: Deferred = Deferred()
        self.journal.pendingSessions = lambda: loading  # type: ignore[method-assign]
        self.queue.start()
        self.post("ci", "new")
        self.post("later", "x")
        self.assertEqual(self.adapter.delivered, [])
        # Counted before "new" was stored: it is counted when it comes.
        loading.callback({"ci": (1, 1)})
        self.assertEqual(self.adapter.contents("ci"), ["old", "new"])
        self.assertEqual(self.adapter.contents("later"), ["x"])
        self.assertEqual(self.queue.pendingCount(), 0)

    def test_retriedWithBackoffThenDelivered(self) -> None:
        self.adapter.failures = 3
        self.queue = self.makeQueue(
            retry=RetryPolicy(maxAttempts=5, initialDelay=1, factor=2, jitter=0),
            interval=1000,
        )
        self.start()
        self.post("ci", "a")
        self.post("ci", "b")
        self.assertEqual(len(self.adapter.delivered), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.adapter.delivered), 2)
        self.clock.advance(1.9)
        self.assertEqual(len(self.adapter.delivered), 2)
        self.clock.advance(0.1)
        self.assertEqual(len(self.adapter.delivered), 3)
        self.clock.advance(4)
        self.assertEqual(self.adapter.contents("ci"), ["a", "b"])
        self.assertEqual(self.journal.rows[1].attempts, 3)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_retryAfterHonoured(self) -> None:
        """
        A failure that says how long to wait (a model server's 429 with
        Retry-After) is retried no sooner; a shorter one keeps the backoff.
        """
        from chatweb.backends import ModelError

        errors = [ModelError("429", True, retryAfter=10.0), ModelError("429", True, retryAfter=0.5)]
        deliver = self.adapter.deliver

        def failing(delivery):  # type: ignore[no-untyped-def]
            if errors:
                self.adapter.delivered.append(delivery)
                return fail(errors.pop(0))
            return deliver(delivery)

        self.adapter.deliver = failing  # type: ignore[method-assign]
        self.queue = self.makeQueue(
            retry=RetryPolicy(maxAttempts=5, initialDelay=1, factor=2, jitter=0),
            interval=1000,
        )
        self.start()
        self.post("ci", "a")
        self.assertEqual(len(self.adapter.delivered), 1)
        self.clock.advance(9.9)
        self.assertEqual(len(self.adapter.delivered), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.adapter.delivered), 2)
        self.clock.advance(1.9)
        self.assertEqual(len(self.adapter.delivered), 2)
        self.clock.advance(0.1)
        self.assertEqual(self.adapter.contents("ci"), ["a"])

    def test_otherSessionsNotHeldByFailures(self) -> None:
        self.start()
        self.adapter.failures = 1
        self.post("failing", "a")
        self.post("fine", "b")
        self.assertEqual(self.adapter.contents("fine"), ["b"])
        self.assertEqual(self.adapter.contents("failing"), [])

    def test_deadLetterKeptAndQueueMovesOn(self) -> None:
        self.queue = self.makeQueue(retry=RetryPolicy(maxAttempts=2, jitter=0))
        self.start()
        self.adapter.failures = 2
        self.post("ci", "doomed")
        self.post("ci", "next")
        self.clock.advance(1)
        self.assertEqual(self.adapter.contents("ci"), ["next"])
        failed = self.successResultOf(self.journal.messages("ci"))
        self.assertEqual([(m.content, m.state, m.attempts) for m in failed], [("doomed", FAILED, 2)])
        self.assertIn("delivery of 1 failed", failed[0].lastError)

    def test_deliveryTimeoutCountsAsFailure(self) -> None:
        self.adapter.autoComplete = False
        self.queue = self.makeQueue(
            deliveryTimeout=30, retry=RetryPolicy(initialDelay=1, jitter=0)
        )
        self.start()
        self.post("ci", "slow")
        self.clock.advance(30)
        self.assertEqual(len(self.adapter.cancelled), 1)
        self.assertEqual(self.journal.rows[1].attempts, 1)
        self.assertIn("TimeoutError", self.journal.rows[1].lastError)
        self.clock.advance(1)
        self.adapter.complete()
        self.assertEqual(self.adapter.contents("ci"), ["slow"])

    def test_stopWaitsForInFlightThenLeavesRestPending(self) -> None:
        self.adapter.autoComplete = False
        self.start()
        self.post("ci", "a")
        self.post("ci", "b")
        stopped = self.queue.stop(timeout=10)
        self.assertNoResult(stopped)
        self.adapter.complete()
        self.successResultOf(stopped)
        self.assertEqual(self.adapter.contents("ci"), ["a"])
        pending = self.successResultOf(self.journal.pending())
        self.assertEqual([m.content for m in pending], ["b"])

    def test_stopCancelsAfterTimeoutWithoutCountingAFailure(self) -> None:
        self.adapter.autoComplete = False
        self.start()
        self.post("ci", "a")
        stopped = self.queue.stop(timeout=10)
        self.clock.advance(10)
        self.successResultOf(stopped)
        self.assertEqual(self.journal.rows[1].attempts, 0)
        self.assertEqual(len(self.successResultOf(self.journal.pending())), 1)

    def test_adapterToldWhyItWasCancelled(self) -> None:
        """
        A cancelled delivery says why: stopped (POST /session/{id}/stop),
        timed out, or cut by the queue stopping, so that an adapter keeping
        a partial answer marks it truly.
        """
        reasons: list[str] = []
        adapter = self.adapter

        def deliver(delivery: Delivery) -> Deferred[None]:
            inner = MemoryAdapter.deliver(adapter, delivery)

            def cancel(outer: Deferred[None]) -> None:
                assert delivery.cancelReason is not None
                reasons.append(delivery.cancelReason())
                inner.cancel()

            outer: Deferred[None] = Deferred(cancel)
            inner.chainDeferred(outer)
            return outer

        adapter.deliver = deliver  # type: ignore[method-assign]
        adapter.autoComplete = False
        self.queue = self.makeQueue(
            deliveryTimeout=30, retry=RetryPolicy(initialDelay=1, jitter=0)
        )
        self.start()
        self.post("ci", "a")
        self.assertTrue(self.successResultOf(self.queue.stopSession("ci")))
        self.post("ci", "b")
        self.clock.advance(30)
        self.clock.advance(1)  # tried again
        stopped = self.queue.stop(timeout=10)
        self.clock.advance(10)
        self.successResultOf(stopped)
        self.assertEqual(reasons, ["stop", "timeout", "shutdown"])
        # Each delivery keeps its own reason, then and later; one not
        # cancelled has none.
        self.assertEqual([d.cancelReason() for d in adapter.delivered if d.cancelReason],
                         ["stop", "timeout", "shutdown"])
        self.queue = self.makeQueue()
        adapter.autoComplete = True
        self.start()
        self.post("ci", "c")
        last = adapter.delivered[-1]
        assert last.cancelReason is not None
        self.assertEqual((last.content, last.cancelReason()), ("c", None))

    def cancelledWith(self, error: Exception) -> None:
        """
        Make the adapter's deliveries fail with C{error} when cancelled.
        """
        adapter = self.adapter

        def deliver(delivery: Delivery) -> Deferred[None]:
            inner = MemoryAdapter.deliver(adapter, delivery)

            def cancel(outer: Deferred[None]) -> None:
                inner.addErrback(lambda _: None)
                inner.cancel()
                outer.errback(error)

            outer: Deferred[None] = Deferred(cancel)
            inner.addCallback(outer.callback)
            return outer

        adapter.deliver = deliver  # type: ignore[method-assign]

    def test_stoppedWhateverTheAdapterRaises(self) -> None:
        """
        A stopped delivery counts as delivered and is not retried, even if
        the adapter's cancellation fails with an error of its own rather
        than CancelledError.
        """
        adapter = self.adapter
        self.cancelledWith(RuntimeError("stopped by request"))
        adapter.autoComplete = False
        self.start()
        self.post("ci", "a")
        self.post("ci", "b")
        self.assertTrue(self.successResultOf(self.queue.stopSession("ci")))
        row = self.journal.rows[1]
        self.assertEqual((row.state, row.attempts), ("delivered", 0))
        self.assertEqual([x.content for x, _ in adapter.waiting], ["b"])

    def test_timeoutSaysHowLong(self) -> None:
        """
        A delivery cut by the timeout fails saying so, whatever the
        adapter's cancellation raised.
        """
        self.cancelledWith(RuntimeError("cancelled"))
        self.adapter.autoComplete = False
        self.queue = self.makeQueue(deliveryTimeout=30)
        self.start()
        self.post("ci", "slow")
        self.clock.advance(30)
        self.assertEqual(self.journal.rows[1].lastError,
                         "TimeoutError: the delivery took longer than 30 s")

    def test_longSynchronousQueueDoesNotRecurse(self) -> None:
        """
        Thousands of messages delivered synchronously do not exhaust the
        stack.
        """
        self.adapter.setBusy("ci")
        self.start()
        for n in range(3000):
            self.post("ci", str(n))
        self.adapter.setBusy("ci", False)
        self.assertEqual(len(self.adapter.contents("ci")), 3000)

    def test_retryPolicyBoundedAndJittered(self) -> None:
        policy = RetryPolicy(initialDelay=1, factor=2, maxDelay=60, jitter=0.2)
        rng = random.Random(7)
        delays = [policy.delay(n, rng) for n in range(1, 12)]
        self.assertTrue(all(0.8 * min(60, 2 ** (n - 1)) <= d <= 1.2 * min(60, 2 ** (n - 1))
                            for n, d in zip(range(1, 12), delays)))
        self.assertLessEqual(max(delays), 72)
        self.assertNotEqual(delays[0], delays[1] / 2)

    def test_failingJournalAppendDoesNotStopOthers(self) -> None:
        self.start()
        self.journal.failAppends = True
        self.failureResultOf(self.queue.post("a", "x"))
        self.journal.failAppends = False
        self.post("a", "y")
        self.assertEqual(self.adapter.contents("a"), ["y"])

    def test_adapterDeliverRaisingSynchronously(self) -> None:
        """
        An adapter whose deliver() raises is treated as a failed delivery.
        """
        self.start()
        calls = []

        def deliver(delivery):  # type: ignore[no-untyped-def]
            calls.append(delivery)
            if len(calls) == 1:
                raise ValueError("boom")
            return fail(ValueError("boom again")) if len(calls) == 2 else original(delivery)

        original = self.adapter.deliver
        self.adapter.deliver = deliver  # type: ignore[method-assign]
        self.post("ci", "x")
        self.clock.advance(1.5)
        self.clock.advance(3)
        self.assertEqual(self.adapter.contents("ci"), ["x"])


class FailingBackendTests(SynchronousTestCase):
    """
    The checks of a failing backend: messages retried in order, or kept as
    visible dead letters, never dropped.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.journal = MemoryJournal()
        self.adapter = MemoryAdapter()
        self.queue = MessageQueue(
            self.journal,
            self.adapter,
            self.clock,
            retry=RetryPolicy(maxAttempts=5, initialDelay=1, maxDelay=8),
            rng=random.Random(3),
        )
        self.successResultOf(self.queue.start())

    def run_until_quiet(self) -> None:
        for _ in range(200):
            self.clock.advance(1)

    def test_firstThreeDeliveriesOfEveryMessageFail(self) -> None:
        tries: dict[int, int] = {}
        original = self.adapter.deliver

        def flaky(delivery):  # type: ignore[no-untyped-def]
            tries[delivery.id] = tries.get(delivery.id, 0) + 1
            if tries[delivery.id] <= 3:
                return fail(RuntimeError("not yet"))
            return original(delivery)

        self.adapter.deliver = flaky  # type: ignore[method-assign]
        for n in range(10):
            self.successResultOf(self.queue.post(f"s{n % 3}", f"m{n}"))
        self.run_until_quiet()
        for s in range(3):
            self.assertEqual(
                self.adapter.contents(f"s{s}"), [f"m{n}" for n in range(10) if n % 3 == s]
            )
        self.assertEqual(set(tries.values()), {4})
        self.assertEqual(self.successResultOf(self.journal.pending()), [])

    def test_alwaysFailingEndsAsVisibleDeadLetters(self) -> None:
        self.adapter.deliver = lambda d: fail(RuntimeError("backend down"))  # type: ignore[method-assign]
        for n in range(4):
            self.successResultOf(self.queue.post("ci", f"m{n}"))
        self.run_until_quiet()
        failed = self.successResultOf(self.journal.messages("ci"))
        self.assertEqual([(m.content, m.state, m.attempts) for m in failed],
                         [(f"m{n}", FAILED, 5) for n in range(4)])
        self.assertTrue(all("backend down" in m.lastError for m in failed))
        self.successResultOf(self.queue.whenDelivered())

    def test_retryAndDiscardDeadLetters(self) -> None:
        self.adapter.failures = 5
        self.successResultOf(self.queue.post("ci", "dead"))
        self.run_until_quiet()
        self.assertEqual(self.journal.rows[1].state, FAILED)
        self.successResultOf(self.queue.post("ci", "next"))
        retried = self.successResultOf(self.queue.retry(1))
        self.assertEqual((retried.state, retried.attempts), ("pending", 0))
        self.assertEqual(self.adapter.contents("ci"), ["next", "dead"])
        self.failureResultOf(self.queue.retry(1), WrongState)
        self.failureResultOf(self.queue.retry(99), UnknownMessage)
        self.adapter.setBusy("ci")
        self.successResultOf(self.queue.post("ci", "unwanted"))
        self.successResultOf(self.queue.discard(3))
        self.adapter.setBusy("ci", False)
        self.assertEqual(self.adapter.contents("ci"), ["next", "dead"])
        self.failureResultOf(self.queue.discard(3), WrongState)

    def test_deadLetterRetriedDuringAFailingDeliveryGoesFirst(self) -> None:
        """
        A dead letter retried while a newer message of its session is being
        delivered waits for that delivery; if it fails, the retried (older)
        message goes first, in its place by id.  (Found by the state
        machine of test_queue_stateful.)
        """
        self.adapter.failures = 5
        self.successResultOf(self.queue.post("ci", "old"))
        self.run_until_quiet()
        self.assertEqual(self.journal.rows[1].state, FAILED)
        self.adapter.autoComplete = False
        self.successResultOf(self.queue.post("ci", "new"))
        self.successResultOf(self.queue.retry(1))
        self.adapter.failWaiting()
        self.run_until_quiet()
        self.assertEqual([d.content for d, _ in self.adapter.waiting], ["old"])
        self.adapter.complete()
        self.adapter.complete()
        self.assertEqual(self.adapter.contents("ci"), ["old", "new"])

    def test_discardWhileWaitingToRetry(self) -> None:
        """
        The head message, failing and waiting for its retry, is discarded:
        it is never delivered, and the session's next message goes ahead.
        """
        self.adapter.failures = 1
        self.successResultOf(self.queue.post("ci", "unwanted"))
        self.assertEqual(self.journal.rows[1].attempts, 1)
        self.successResultOf(self.queue.discard(1))
        self.successResultOf(self.queue.post("ci", "wanted"))
        self.run_until_quiet()
        self.assertEqual(self.adapter.contents("ci"), ["wanted"])
        self.assertEqual(self.journal.rows[1].state, "discarded")
        self.successResultOf(self.queue.whenDelivered())

    def test_discardOtherKeepsHeadBackoff(self) -> None:
        self.adapter.failures = 1
        self.successResultOf(self.queue.post("ci", "head"))
        self.adapter.setBusy("ci")
        self.successResultOf(self.queue.post("ci", "second"))
        self.adapter.setBusy("ci", False)
        self.successResultOf(self.queue.discard(2))
        self.assertEqual(self.adapter.contents("ci"), [])
        self.run_until_quiet()
        self.assertEqual(self.adapter.contents("ci"), ["head"])

    def test_discardDuringStartupLoad(self) -> None:
        journal = MemoryJournal()
        journal.append("ci", "old", 0)
        loading: Deferred = Deferred()
        journal.pendingSessions = lambda: loading  # type: ignore[method-assign]
        queue = MessageQueue(journal, self.adapter, self.clock)
        queue.start()
        discarded = queue.discard(1)
        loading.callback({"ci": (1, 1)})
        self.successResultOf(discarded)
        self.assertEqual(self.adapter.delivered, [])
        self.assertEqual(journal.rows[1].state, "discarded")

    def test_discardWhileDeliveringRefused(self) -> None:
        self.adapter.autoComplete = False
        self.successResultOf(self.queue.post("ci", "busy"))
        self.failureResultOf(self.queue.discard(1), WrongState)

    def test_pendingLimits(self) -> None:
        queue = MessageQueue(self.journal, self.adapter, self.clock,
                             maxPendingPerSession=2, maxPendingTotal=3)
        self.successResultOf(queue.start())
        self.adapter.setBusy("a")
        self.adapter.setBusy("b")
        self.successResultOf(queue.post("a", "1"))
        self.successResultOf(queue.post("a", "2"))
        full = self.failureResultOf(queue.post("a", "3"), QueueFull).value
        self.assertEqual((full.scope, full.limit), ("session", 2))
        self.successResultOf(queue.post("b", "1"))
        full = self.failureResultOf(queue.post("b", "2"), QueueFull).value
        self.assertEqual(full.scope, "total")
        self.assertEqual(len(self.journal.rows), 3)
        self.adapter.setBusy("a", False)
        self.successResultOf(queue.post("a", "3"))

    def test_idempotentRepeatNotQueuedTwice(self) -> None:
        first = self.successResultOf(self.queue.post("ci", "once", "key-1"))
        again = self.successResultOf(self.queue.post("ci", "once", "key-1"))
        self.assertEqual(first.id, again.id)
        self.assertTrue(again.duplicate)
        self.assertEqual(self.adapter.contents("ci"), ["once"])
        self.failureResultOf(self.queue.post("other", "once", "key-1"), IdempotencyConflict)
        self.failureResultOf(self.queue.post("ci", "twice", "key-1"), IdempotencyConflict)

    def test_idempotencyKeyForgottenAfterADayOfTheClock(self) -> None:
        """
        The queue's clock drives the 24-hour window: a day later the same
        key and message are a new message, delivered again.
        """
        self.successResultOf(self.queue.post("ci", "daily"))
        first = self.successResultOf(self.queue.post("ci", "daily", "key-1"))
        self.clock.advance(24 * 60 * 60)
        again = self.successResultOf(self.queue.post("ci", "daily", "key-1"))
        self.assertEqual((again.id, again.duplicate), (first.id, True))
        self.clock.advance(1)
        later = self.successResultOf(self.queue.post("ci", "daily", "key-1"))
        self.assertFalse(later.duplicate)
        self.assertEqual(self.adapter.contents("ci"), ["daily"] * 3)

    def test_bookkeepingErrorDoesNotStallTheSession(self) -> None:
        """
        An exception while recording an outcome still frees the session.
        """
        original = self.journal.markDelivered
        calls = []

        def broken(messageId):  # type: ignore[no-untyped-def]
            calls.append(messageId)
            if len(calls) == 1:
                raise RuntimeError("bookkeeping bug")
            return original(messageId)

        self.journal.markDelivered = broken  # type: ignore[method-assign]
        self.successResultOf(self.queue.post("ci", "a"))
        self.successResultOf(self.queue.post("ci", "b"))
        self.assertEqual(self.adapter.contents("ci"), ["a", "b"])
        self.flushLoggedErrors(RuntimeError)

    def test_adapterRaisingOnPostStillAcknowledges(self) -> None:
        """
        Stored is stored: an adapter that raises when asked whether it is
        busy does not turn a stored message into a failed post.
        """
        self.adapter.isBusy = lambda s: 1 / 0  # type: ignore[method-assign]
        message = self.successResultOf(self.queue.post("ci", "kept"))
        self.assertEqual(self.journal.rows[message.id].content, "kept")
        self.flushLoggedErrors(ZeroDivisionError)

    def test_hugeAttemptCountsDoNotOverflow(self) -> None:
        policy = RetryPolicy(maxAttempts=100000, maxDelay=60, jitter=0)
        self.assertEqual(policy.delay(5000, random.Random()), 60)


class StoreIsTheTruthTests(SynchronousTestCase):
    """
    The queue keeps per session only counts and the next message; it reads
    the rest from the journal when it needs it.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.journal = MemoryJournal()
        self.adapter = MemoryAdapter()
        self.queue = MessageQueue(self.journal, self.adapter, self.clock)

    def test_startReadsCountsNotBodies(self) -> None:
        """
        Starting does not load every pending message; what is pending is
        still delivered, in order, and counted for the limits.
        """
        for n in range(3):
            self.journal.append("busy", f"m{n}", 0)

        def everything() -> None:
            raise AssertionError("the queue loaded every pending message")

        self.journal.pending = everything  # type: ignore[method-assign]
        self.adapter.setBusy("busy")
        self.successResultOf(self.queue.start())
        self.assertEqual(self.queue.pendingCount(), 3)
        self.assertEqual(self.queue.sessionsWithPending(), {"busy"})
        self.adapter.setBusy("busy", False)
        self.assertEqual(self.adapter.contents("busy"), ["m0", "m1", "m2"])
        self.assertEqual(self.queue.pendingCount(), 0)

    def test_discardDuringAHeadReadIsNotDelivered(self) -> None:
        """
        A message discarded while the queue reads it as the next one is
        never delivered; the one after it is.
        """
        self.successResultOf(self.queue.start())
        reads: list[Deferred] = []
        original = self.journal.nextPending

        def slow(session: str, afterId: int = 0) -> Deferred:
            # Read now (a snapshot), answered later.
            snapshot = self.successResultOf(original(session, afterId))
            d: Deferred = Deferred()
            reads.append(d)
            d.addCallback(lambda _: snapshot)
            return d

        self.journal.nextPending = slow  # type: ignore[method-assign]
        # One in flight: the messages behind it are read back as heads.
        self.adapter.autoComplete = False
        self.successResultOf(self.queue.post("ci", "before"))
        first = self.successResultOf(self.queue.post("ci", "discard me"))
        self.successResultOf(self.queue.post("ci", "keep"))
        self.adapter.complete()
        self.adapter.autoComplete = True
        self.assertEqual(len(reads), 1)
        self.successResultOf(self.queue.discard(first.id))
        while reads:
            reads.pop(0).callback(None)
        self.assertEqual(self.adapter.contents("ci"), ["before", "keep"])
        self.assertEqual(self.journal.rows[first.id].state, "discarded")


class HeldLeases:
    """
    Leases (as L{chatweb.store.PostgreSQLDatabase}'s) whose claims the test
    answers.
    """

    ttl = 15.0

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.claims: list[Deferred[bool]] = []

    def claim(self, session: str) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.claims.append(d)
        return d

    def release(self, session: str) -> Deferred[None]:
        self.held.discard(session)
        return succeed(None)

    def renew(self) -> Deferred[int]:
        return succeed(0)


class LeaseTests(SynchronousTestCase):
    def test_noticeDuringAFailedClaim(self) -> None:
        """
        Another instance's commit noticed while this one's claim of the
        session is under way (it may be the holder's release, committed
        after the claim found the lease held) is not lost when the claim
        fails: the session is claimed again at once, not at the next
        sweep.
        """
        leases = HeldLeases()
        adapter = MemoryAdapter()
        queue = MessageQueue(MemoryJournal(), adapter, Clock(), leases=leases)
        self.successResultOf(queue.start())
        self.successResultOf(queue.post("ci", "hello"))
        self.assertEqual(len(leases.claims), 1)
        queue.othersChanged()
        leases.claims[0].callback(False)
        self.assertEqual(len(leases.claims), 2)
        leases.claims[1].callback(True)
        self.assertEqual(adapter.contents("ci"), ["hello"])

    def test_claimFailedWithoutNotice(self) -> None:
        """
        A claim that fails with no notice meanwhile waits for one: no
        claim after claim while another instance holds the lease.
        """
        leases = HeldLeases()
        queue = MessageQueue(MemoryJournal(), MemoryAdapter(), Clock(), leases=leases)
        self.successResultOf(queue.start())
        self.successResultOf(queue.post("ci", "hello"))
        leases.claims[0].callback(False)
        self.assertEqual(len(leases.claims), 1)
        queue.othersChanged()
        self.assertEqual(len(leases.claims), 2)
