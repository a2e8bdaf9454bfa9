"""
The queue as a state machine (hypothesis): random sequences of posts, busy
and idle sessions, deliveries that complete or fail, time passing, retries
and discards of messages, stops, and restarts from the journal, checked
after every step against the queue's promises:

  - per session, a delivery is always of the oldest message still pending
    (first in, first out);
  - at most one delivery in flight per session;
  - nothing lost: every accepted message is delivered, pending (and known
    to the running queue), failed for good or discarded on purpose, and at
    the end, with the sessions idle and the backend working, every message
    that was not discarded or failed for good is delivered;
  - nothing delivered twice.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from chatweb.errors import UnknownMessage, WrongState
from chatweb.model import DELIVERED, DISCARDED, FAILED, PENDING, Delivery
from chatweb.queue import MessageQueue, RetryPolicy
from chatweb.testing import MemoryAdapter, MemoryJournal

SESSIONS = st.sampled_from(["a", "b", "c"])


def refused(failure: Failure, *errors: type[Exception]) -> None:
    """
    Swallow a refusal of one of the expected kinds (anything else stays a
    failure).
    """
    failure.trap(*errors)


class CheckingAdapter(MemoryAdapter):
    """
    A L{MemoryAdapter} whose deliveries wait for the test, which is busy
    only when told (so the queue alone keeps one delivery per session), and
    which checks each delivery as it starts.
    """

    def __init__(self, machine: QueueMachine) -> None:
        super().__init__(autoComplete=False)
        self.machine = machine
        #: Ids of the deliveries completed, in order (repeats included).
        self.completed: list[int] = []

    def isBusy(self, sessionId: str) -> bool:
        return sessionId in self._busy

    def deliver(self, delivery: Delivery) -> Deferred[None]:
        # An exception here would be a failed delivery to the queue: keep
        # it for the invariant to report.
        try:
            self.machine.checkDeliveryStarts(delivery)
        except Exception as e:
            self.machine.violations.append(f"{type(e).__name__}: {e}")
        return super().deliver(delivery)

    def _record(self, delivery: Delivery) -> None:
        self.completed.append(delivery.id)
        super()._record(delivery)

    def forgetProcess(self) -> None:
        """
        The chatweb process died: its deliveries and idle waits die too.
        """
        self.waiting.clear()
        self._idle.clear()


class QueueMachine(RuleBasedStateMachine):
    """
    One chatweb queue over a journal and an adapter; C{stop} stops it
    cleanly and starts a new queue from the same journal.
    """

    def __init__(self) -> None:
        super().__init__()
        self.journal = MemoryJournal()
        self.adapter = CheckingAdapter(self)
        self.clock = Clock()
        #: Every message accepted (its post fired): id -> (session, content).
        self.accepted: dict[int, tuple[str, str]] = {}
        self.discarded: set[int] = set()
        #: What was wrong with deliveries as they started.
        self.violations: list[str] = []
        self.posts = 0
        self.queue = self.newQueue()

    def newQueue(self) -> MessageQueue:
        queue = MessageQueue(
            self.journal,
            self.adapter,
            self.clock,
            interval=5.0,
            retry=RetryPolicy(maxAttempts=3, initialDelay=1.0, maxDelay=4.0),
            deliveryTimeout=60.0,
            rng=random.Random(0),
        )
        started = queue.start()
        assert started.called, "a journal in memory loads at once"
        return queue

    # -- checks made as a delivery starts

    def checkDeliveryStarts(self, delivery: Delivery) -> None:
        # (It may start before its post fires: look it up in the journal.)
        stored = self.journal.rows[delivery.id]
        assert (delivery.session, delivery.content) == (stored.session, stored.content)
        session = delivery.session
        inFlight = [d.id for d, _ in self.adapter.waiting if d.session == session]
        assert not inFlight, f"{delivery.id} starts while {inFlight} is in flight"
        assert delivery.id not in self.adapter.completed, f"{delivery.id} again"
        oldest = min(
            m.id
            for m in self.journal.rows.values()
            if m.session == session and m.state == PENDING
        )
        assert delivery.id == oldest, f"{delivery.id} delivered before {oldest}"

    # -- rules

    @rule(session=SESSIONS)
    def post(self, session: str) -> None:
        self.posts += 1
        content = f"message {self.posts}"
        posted = self.queue.post(session, content)
        assert posted.called
        message = posted.result
        assert message.content == content, message
        self.accepted[message.id] = (session, content)

    @rule(session=SESSIONS)
    def busy(self, session: str) -> None:
        self.adapter.setBusy(session)

    @rule(session=SESSIONS)
    def idle(self, session: str) -> None:
        self.adapter.setBusy(session, False)

    @precondition(lambda self: self.adapter.waiting)
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        self.adapter.complete(data.draw(st.integers(0, len(self.adapter.waiting) - 1)))

    @precondition(lambda self: self.adapter.waiting)
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        self.adapter.failWaiting(data.draw(st.integers(0, len(self.adapter.waiting) - 1)))

    @rule(seconds=st.sampled_from([0.5, 1, 5, 30]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: self.accepted)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """
        Retry a message: one failed for good goes back in the queue; any
        other is refused.
        """
        messageId = data.draw(st.sampled_from(sorted(self.accepted)))
        failed = self.journal.rows[messageId].state == FAILED
        d = self.queue.retry(messageId)
        assert d.called
        if failed:
            assert self.journal.rows[messageId].state in (PENDING, DELIVERED), d.result
        else:
            d.addErrback(refused, WrongState, UnknownMessage)
            assert d.result is None, d.result

    @precondition(lambda self: self.accepted)
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        """
        Discard a message: one pending or failed (and not being delivered)
        is dropped for good; any other is refused.
        """
        messageId = data.draw(st.sampled_from(sorted(self.accepted)))
        session, _ = self.accepted[messageId]
        state = self.journal.rows[messageId].state
        delivering = self.queue.deliveringNow(session) == messageId
        d = self.queue.discard(messageId)
        assert d.called
        if state in (PENDING, FAILED) and not delivering:
            assert not isinstance(d.result, Exception) and d.result is not None, d.result
            self.discarded.add(messageId)
        else:
            d.addErrback(refused, WrongState)
            assert d.result is None, d.result
            assert self.journal.rows[messageId].state == state

    @rule()
    def stop(self) -> None:
        """
        Stop cleanly (deliveries under way are cancelled once the timeout
        passes), then start a new queue from the same journal.
        """
        stopped = self.queue.stop(timeout=10)
        self.clock.advance(10)
        assert stopped.called
        assert not self.adapter.waiting, self.adapter.waiting
        self.queue = self.newQueue()

    # -- invariants

    @invariant()
    def deliveriesStartedRight(self) -> None:
        assert not self.violations, self.violations

    @invariant()
    def oneInFlightPerSession(self) -> None:
        counts = Counter(d.session for d, _ in self.adapter.waiting)
        assert all(n == 1 for n in counts.values()), counts

    @invariant()
    def nothingDeliveredTwice(self) -> None:
        counts = Counter(self.adapter.completed)
        assert all(n == 1 for n in counts.values()), counts

    @invariant()
    def nothingLost(self) -> None:
        """
        Each accepted message is in exactly one place: delivered (and the
        adapter has it), discarded, failed for good, or pending, and then
        the running queue is delivering it or holds it.
        """
        completed = set(self.adapter.completed)
        assert set(self.journal.rows) == set(self.accepted)
        for messageId, (session, content) in self.accepted.items():
            state = self.journal.rows[messageId].state
            assert (state == DELIVERED) == (messageId in completed), (messageId, state)
            assert (state == DISCARDED) == (messageId in self.discarded), (messageId, state)
            if state == PENDING:
                held = [m.id for m in self.pendingFor(session)]
                assert messageId in held, (messageId, held)
        for session in {s for s, _ in self.accepted.values()}:
            held = [m.id for m in self.pendingFor(session)]
            assert held == sorted(held) or self.queue.deliveringNow(session) == held[0], held
            assert len(held) == len(set(held)), held

    def pendingFor(self, session: str) -> list:
        got: list = []
        self.queue.pendingFor(session).addCallback(got.extend)
        return got

    def teardown(self) -> None:
        """
        With every session idle and the backend working, everything not
        discarded or failed for good is delivered, once.
        """
        self.adapter.failures = 0
        for session in list(self.adapter._busy):
            self.adapter.setBusy(session, False)
        for _ in range(100):
            for _ in range(len(self.accepted) + 1):
                if self.adapter.waiting:
                    self.adapter.complete()
            if not any(m.state == PENDING for m in self.journal.rows.values()):
                break
            self.clock.advance(5)
        self.deliveriesStartedRight()
        delivered = self.queue.whenDelivered()
        assert delivered.called
        self.nothingLost()
        self.nothingDeliveredTwice()
        for messageId in self.accepted:
            state = self.journal.rows[messageId].state
            assert state in (DELIVERED, DISCARDED, FAILED), (messageId, state)
        self.queue.stop()


class RestartingQueueMachine(QueueMachine):
    """
    The same, and the process may also die at any moment (no stop, its
    deliveries and timers gone) and start again from the journal.
    """

    @rule()
    def crashAndRestart(self) -> None:
        self.adapter.forgetProcess()
        # The dead process's timers never fire: the new one has its own clock.
        clock = Clock()
        clock.advance(self.clock.seconds())
        self.clock = clock
        self.queue = self.newQueue()


SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class QueueStateMachineTests(SynchronousTestCase):
    def test_queueKeepsItsPromises(self) -> None:
        run_state_machine_as_test(QueueMachine, settings=SETTINGS)

    def test_queueKeepsItsPromisesAcrossCrashes(self) -> None:
        run_state_machine_as_test(RestartingQueueMachine, settings=SETTINGS)
