"""
The message queue: per-session FIFO delivery to a session adapter.

Its promises:
  - L{MessageQueue.post} fires only once the message is in the journal;
  - per session, messages are delivered strictly in the order received, one
    at a time; sessions do not wait for each other;
  - a message is delivered as soon as its session is idle: at once, when the
    adapter reports idle, or at the latest on the next sweep;
  - a failed delivery is retried with bounded, jittered exponential backoff,
    and after C{maxAttempts} the message is kept as failed (a dead letter).
"""

from __future__ import annotations

import random
from typing import Any, Callable

import attrs
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    maybeDeferred,
    fail,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from chatweb.errors import QueueFull, WrongState
from chatweb.interfaces import IJournal, ISessionAdapter
from chatweb.store._journal import EVENT_RETENTION, Recorder
from chatweb.store._sqlite import DatabaseClosed
from chatweb.store._unreachable import logFailure
from chatweb.model._values import (
    DELIVERED,
    PENDING,
    CancelReason,
    EventKind,
    QueuedMessage,
)

_log = Logger()

#: Seconds between the log's summaries of messages queued and delivered
#: (unless each message is logged: see L{MessageQueue.logEachMessage}).
SUMMARY_INTERVAL = 60.0

#: Lines "queued" and "delivered" logged one by one in each of those
#: intervals before the rest are only counted: a user trying chatweb sees
#: each message, a server under load does not spend its time logging.
EACH_MESSAGE_LINES = 100


@attrs.frozen
class RetryPolicy:
    """
    How failed deliveries are retried: the n-th retry waits
    C{min(maxDelay, initialDelay * factor ** (n - 1))}, give or take
    C{jitter} of it, and a message that failed C{maxAttempts} times is kept
    as failed.
    """

    maxAttempts: int = 10
    initialDelay: float = 1.0
    factor: float = 2.0
    maxDelay: float = 300.0
    jitter: float = 0.2

    def delay(self, attempts: int, rng: random.Random) -> float:
        exponent = min(max(attempts - 1, 0), 64)
        base = min(self.maxDelay, self.initialDelay * self.factor**exponent)
        return max(0.0, base * (1 + self.jitter * (2 * rng.random() - 1)))


@attrs.define
class _SessionQueue:
    """
    What the queue keeps in memory of a session with work: counts and the
    next message, never the whole queue (the journal is its truth).
    """

    #: Its pending messages in the journal (the one in flight included).
    count: int = 0
    #: The next message to deliver, as read from the journal (None: read it
    #: when it is needed).
    head: QueuedMessage | None = None
    #: A read of the head under way.
    reading: Deferred[Any] | None = None
    #: Bumped whenever the order may have changed (a retry, a discard): a
    #: head read that started before is stale.
    generation: int = 0
    #: Delivered, but the journal could not record it: the head is read
    #: after this id (until a restart delivers it again, or a retry).
    skipThrough: int = 0
    delivering: QueuedMessage | None = None
    inFlight: Deferred[Any] | None = None
    idleWait: Deferred[Any] | None = None
    woken: bool = False
    retryCall: IDelayedCall | None = None
    #: When the delivery in flight started (the clock's seconds).
    startedAt: float = 0.0
    #: Why the delivery in flight is cancelled, once it is: a stop (POST
    #: /session/{id}/stop) is not a failure, nor is chatweb stopping.
    cancelling: _Cancelling = attrs.field(factory=lambda: _Cancelling())
    #: Fired when the stopped delivery is settled.
    stopWaiters: list[Deferred[None]] = attrs.field(factory=list)
    #: With leases (several instances): this instance holds the session's
    #: lease; a claim is under way; another instance holds it.
    claimed: bool = False
    claiming: bool = False
    leaseTaken: bool = False
    #: Another instance committed something while a claim was under way:
    #: if the claim fails, it may have released the lease since.
    changedWhileClaiming: bool = False

    def cancelRetry(self) -> None:
        if self.retryCall is not None and self.retryCall.active():
            self.retryCall.cancel()
        self.retryCall = None


@attrs.define
class _Cancelling:
    """
    Why the queue cancelled one delivery, set just before it does: what that
    delivery's C{cancelReason()} answers, then and later.
    """

    reason: CancelReason | None = None


def describeFailure(failure: Failure) -> str:
    """
    A one-line account of why a delivery failed, for the journal.
    """
    message = failure.getErrorMessage()
    name = failure.type.__name__ if failure.type else "Error"
    return f"{name}: {message}" if message else name


class MessageQueue:
    """
    Per-session FIFO queues in front of an L{ISessionAdapter}, kept in an
    L{IJournal}.
    """

    def __init__(
        self,
        journal: IJournal,
        adapter: ISessionAdapter,
        clock: IReactorTime,
        interval: float = 5.0,
        retry: RetryPolicy = RetryPolicy(),
        deliveryTimeout: float | None = 600.0,
        rng: random.Random | None = None,
        maxPendingPerSession: int | None = None,
        maxPendingTotal: int | None = None,
        eventRetention: float = EVENT_RETENTION,
        leases: Any = None,
        logEachMessage: bool = False,
        recorder: Callable[[], Recorder | None] | None = None,
    ) -> None:
        #: The adapter's L{chatweb.backends.LocalBackend.recorder}, when
        #: it keeps its sessions in the journal's database: a message to a
        #: session with nothing pending is then stored and delivered in one
        #: write (L{IJournal.appendRecorded}).
        self._recorder = recorder
        #: Such writes under way, by session.
        self._recording: dict[str, int] = {}
        #: Failed messages being queued again (L{retry}).
        self._requeuing = 0
        #: Log every message queued and delivered (info).  Off, the first
        #: L{EACH_MESSAGE_LINES} of each minute are, and the sweep logs how
        #: many more were, at most once a minute: formatting and writing
        #: two log lines per message took a fifth of the reactor under POST
        #: load.  Failures are logged each time either way.
        self.logEachMessage = logEachMessage
        self._linesSince = 0
        self._queuedSince = 0
        self._deliveredSince = 0
        self._summarizedAt: float | None = None
        #: Claims on sessions shared with other instances (see
        #: L{chatweb.store.PostgreSQLDatabase}): a session is delivered to
        #: only while its lease is held.  None: this instance is alone.
        self._leases = leases
        self._renewal: LoopingCall | None = None
        self._journal = journal
        self._adapter = adapter
        self._clock = clock
        self._retry = retry
        self._deliveryTimeout = deliveryTimeout
        self._rng = rng or random.Random()
        self._queues: dict[str, _SessionQueue] = {}
        self._maxPerSession = maxPendingPerSession
        self._maxTotal = maxPendingTotal
        self._reserved: dict[str, int] = {}
        #: Messages stored while the start-up counts were being read.
        self._early: list[QueuedMessage] = []
        self._loadWaiters: list[Deferred[None]] = []
        #: Messages whose discard is being written: never delivered.
        self._discarding: set[int] = set()
        self._reservedTotal = 0
        self._loaded = False
        self._running = False
        self._kicking: set[str] = set()
        self._kickAgain: set[str] = set()
        self._drained: list[Deferred[None]] = []
        self._emptyWaiters: list[Deferred[None]] = []
        #: Events older than this many seconds are pruned by the sweep.
        self.eventRetention = eventRetention
        self._lastPrune: float | None = None
        self._sweep = LoopingCall(self.sweep)
        self._sweep.clock = clock
        self.interval = interval

    # -- lifecycle

    def start(self) -> Deferred[None]:
        """
        Load what the journal still holds and begin delivering it; start
        the sweep.
        """
        self._running = True
        self._summarizedAt = self._clock.seconds()
        self._sweep.start(self.interval, now=False).addErrback(
            lambda f: _log.failure("The queue sweep stopped", f)
        )
        if self._leases is not None:
            self._renewal = LoopingCall(self._renewLeases)
            self._renewal.clock = self._clock
            self._renewal.start(self._leases.ttl / 3, now=False).addErrback(
                lambda f: _log.failure("Lease renewal stopped", f)
            )
        return self._journal.pendingSessions().addCallback(self._loadPending)

    def _loadPending(self, pending: dict[str, tuple[int, int]]) -> None:
        # Messages stored while the counts were read are counted by them
        # if their id is at most the session's last pending id then.
        for session, (count, _) in pending.items():
            self._queues.setdefault(session, _SessionQueue()).count = count
        early, self._early = self._early, []
        for message in early:
            if message.id > pending.get(message.session, (0, 0))[1]:
                self._queues.setdefault(message.session, _SessionQueue()).count += 1
        self._loaded = True
        total = sum(count for count, _ in pending.values())
        if total:
            _log.info(
                "Resuming delivery of {count} pending message(s) in {sessions}"
                " session(s)",
                count=total,
                sessions=len(pending),
            )
        waiters, self._loadWaiters = self._loadWaiters, []
        for waiter in waiters:
            waiter.callback(None)
        for session in list(self._queues):
            self._kick(session)
        self._maybeEmpty()

    def _whenLoaded(self) -> Deferred[None]:
        if self._loaded:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._loadWaiters.append(waiter)
        return waiter

    def stop(self, timeout: float = 10.0) -> Deferred[None]:
        """
        Stop delivering; wait up to C{timeout} seconds for deliveries under
        way, then cancel them.  What is not delivered stays in the journal.
        """
        self._running = False
        if self._sweep.running:
            self._sweep.stop()
        if self._renewal is not None and self._renewal.running:
            self._renewal.stop()
        for queue in self._queues.values():
            queue.cancelRetry()
            if queue.idleWait is not None:
                wait, queue.idleWait = queue.idleWait, None
                wait.cancel()
        if not self._delivering():
            return succeed(None)
        drained: Deferred[None] = Deferred()
        self._drained.append(drained)
        giveUp = self._clock.callLater(timeout, self._cancelInFlight)

        def stopWaiting(result: object) -> object:
            if giveUp.active():
                giveUp.cancel()
            return result

        drained.addBoth(stopWaiting)
        return drained

    def _delivering(self) -> bool:
        return any(q.delivering is not None for q in self._queues.values())

    def _cancelInFlight(self) -> None:
        for queue in self._queues.values():
            self._cancel(queue, "shutdown")

    def _maybeDrained(self) -> None:
        if not self._running and not self._delivering():
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    # -- posting

    def post(
        self, session: str, content: str, idempotencyKey: str | None = None
    ) -> Deferred[QueuedMessage]:
        """
        Store a message in the journal and queue it for delivery.

        @return: a Deferred that fires with the L{QueuedMessage} once it is
            on disk; it fails with L{QueueFull} when a pending-message limit
            is reached (nothing is stored then).
        """
        queue = self._queues.get(session)
        waiting = (queue.count if queue else 0) + self._reserved.get(session, 0)
        if self._maxPerSession is not None and waiting >= self._maxPerSession:
            return fail(QueueFull("session", self._maxPerSession, self.interval))
        if self._maxTotal is not None and self.pendingCount() >= self._maxTotal:
            return fail(QueueFull("total", self._maxTotal, self.interval))
        record = self._recordNow(session)
        self._reserved[session] = self._reserved.get(session, 0) + 1
        self._reservedTotal += 1
        if record is not None:
            self._recording[session] = self._recording.get(session, 0) + 1

        def release(result: object) -> object:
            self._reservedTotal -= 1
            left = self._reserved[session] - 1
            if left:
                self._reserved[session] = left
            else:
                del self._reserved[session]
            if record is not None:
                left = self._recording[session] - 1
                if left:
                    self._recording[session] = left
                else:
                    del self._recording[session]
            return result

        now = self._clock.seconds()
        if record is not None:
            # Given a recorder, the journal is the SQL one (the service's).
            journal: Any = self._journal
            guard = None if self._leases is None else self._leases.deliverableHere
            return (
                journal.appendRecorded(session, content, now, idempotencyKey, record, guard)
                .addBoth(release)
                .addCallback(self._recorded)
            )
        return (
            self._journal.append(session, content, now, idempotencyKey)
            .addBoth(release)
            .addCallback(self._enqueue)
        )

    def _recordNow(self, session: str) -> Recorder | None:
        """
        The adapter's recorder, if a message posted to C{session} now may be
        delivered in the write that stores it: nothing of the session is
        pending, being delivered, being stored for the normal way or
        queued again (each would be delivered after this one).  With other
        instances, the write asks the same of them (the leases' guard).
        """
        if (
            self._recorder is None
            or self._requeuing
            or not self._loaded
            or not self._running
            or session in self._queues
            or self._reserved.get(session, 0) != self._recording.get(session, 0)
            or self._adapter.isBusy(session)
        ):
            return None
        return self._recorder()

    def _recorded(self, message: QueuedMessage) -> QueuedMessage:
        if message.duplicate:
            return message
        if message.state != DELIVERED:
            # Another instance delivers the session, or has stored
            # messages of it first: this one waits its turn.
            return self._enqueue(message)
        self._noteQueued(message)
        self._noteDelivered(message, 0.0)
        self._maybeEmpty()
        return message

    def _noteQueued(self, message: QueuedMessage) -> None:
        """
        Log that C{message} is stored, or count it for the summary.
        """
        if self._logsEach():
            _log.info(
                "Message {id} queued for session {session!r}",
                id=message.id,
                session=message.session,
                attempt=message.attempts,
            )
        else:
            self._queuedSince += 1

    def _noteDelivered(self, message: QueuedMessage, duration: float) -> None:
        """
        Log that C{message} is delivered, or count it for the summary.
        """
        if self._logsEach():
            _log.info(
                "Message {id} delivered to session {session!r}",
                id=message.id,
                session=message.session,
                attempt=message.attempts + 1,
                duration=duration,
            )
        else:
            self._deliveredSince += 1

    def pendingCount(self) -> int:
        """
        Messages accepted and not yet delivered (nor failed for good).
        """
        return self._reservedTotal + sum(q.count for q in self._queues.values())

    def _enqueue(self, message: QueuedMessage) -> QueuedMessage:
        if message.duplicate:
            return message
        self._noteQueued(message)
        if not self._loaded:
            self._early.append(message)
            return message
        queue = self._queues.setdefault(message.session, _SessionQueue())
        if (
            self._leases is None
            and queue.count == 0
            and queue.head is None
            and queue.reading is None
            and queue.delivering is None
            and message.id > queue.skipThrough
        ):
            # Nothing else of the session is pending: the message just
            # stored is its next one, without reading it back.  (With
            # leases, other instances may have stored earlier ones.)
            queue.head = message
        queue.count += 1
        # The message is on disk: whatever delivery does now, the post
        # succeeded (the sweep tries again).
        try:
            self._kick(message.session)
        except Exception:
            _log.failure("Delivery to session {session!r} failed to start", session=message.session)
        return message

    # -- dead letters and second thoughts

    def retry(self, messageId: int) -> Deferred[QueuedMessage]:
        """
        Queue a failed message again, in its place by id, its attempts
        reset.
        """

        def requeued(message: QueuedMessage) -> QueuedMessage:
            _log.info(
                "Message {id} to session {session!r} queued again by hand",
                id=message.id,
                session=message.session,
                attempt=message.attempts,
            )
            queue = self._queues.setdefault(message.session, _SessionQueue())
            queue.count += 1
            queue.skipThrough = 0
            if queue.delivering is None:
                # It may come before the head: read the head again.
                self._forgetHead(queue)
            self._kick(message.session)
            return message

        # Its session is known only once it is written: meanwhile no post
        # is delivered in the write that stores it (it would go before).
        self._requeuing += 1

        def settled(result: object) -> object:
            self._requeuing -= 1
            return result

        return (
            self._whenLoaded()
            .addCallback(lambda _: self._journal.requeue(messageId))
            .addCallback(requeued)
            .addBoth(settled)
        )

    def _forgetHead(self, queue: _SessionQueue) -> None:
        queue.head = None
        queue.generation += 1

    def discard(self, messageId: int) -> Deferred[QueuedMessage]:
        """
        Drop a pending or failed message for good (the journal keeps it,
        marked discarded).  A message being delivered cannot be discarded.
        """
        if any(q.delivering and q.delivering.id == messageId for q in self._queues.values()):
            return fail(WrongState("delivering"))
        return self._whenLoaded().addCallback(lambda _: self._discard(messageId))

    def _discard(self, messageId: int) -> Deferred[QueuedMessage]:
        if any(q.delivering and q.delivering.id == messageId for q in self._queues.values()):
            return fail(WrongState("delivering"))
        # No delivery of it starts while the discard is written.
        self._discarding.add(messageId)
        for queue in self._queues.values():
            if queue.head is not None and queue.head.id == messageId:
                queue.cancelRetry()
                self._forgetHead(queue)

        def done(message: QueuedMessage) -> QueuedMessage:
            self._discarding.discard(messageId)
            queue = self._queues.get(message.session)
            if queue is not None:
                if message.previousState == PENDING:
                    queue.count -= 1
                self._forgetHead(queue)
                self._kick(message.session)
            return message

        def failed(failure: Failure) -> Failure:
            self._discarding.discard(messageId)
            self.sweep()
            return failure

        return (
            self._journal.discard(messageId)
            .addCallbacks(done, failed)
            .addBoth(self._discarded)
        )

    def _discarded(self, result: Any) -> Any:
        self._maybeEmpty()
        return result

    # -- reading

    def sessionsWithPending(self) -> set[str]:
        """
        The sessions that have messages waiting for delivery.
        """
        return {s for s, q in self._queues.items() if q.count > 0}

    def whenDelivered(self) -> Deferred[None]:
        """
        A Deferred that fires once no message is pending or being delivered
        (messages that failed for good do not count).  For tests and
        orderly shutdowns; it waits as long as a session stays busy.
        """
        waiter: Deferred[None] = Deferred()
        self._emptyWaiters.append(waiter)
        self._maybeEmpty()
        return waiter

    def _maybeEmpty(self) -> None:
        if not self._emptyWaiters or not self._loaded:
            return
        if any(q.count > 0 or q.delivering for q in self._queues.values()):
            return
        waiters, self._emptyWaiters = self._emptyWaiters, []
        for waiter in waiters:
            waiter.callback(None)

    @property
    def journal(self) -> IJournal:
        return self._journal

    def deliveringNow(self, session: str) -> int | None:
        """
        The id of the message being delivered to C{session}, if any.
        """
        queue = self._queues.get(session)
        return queue.delivering.id if queue and queue.delivering else None

    def pendingFor(self, session: str) -> Deferred[list[QueuedMessage]]:
        """
        The messages of C{session} waiting for delivery (the one in flight
        included), read from the journal, in id order.
        """
        return self._journal.messages(session).addCallback(
            lambda messages: [m for m in messages if m.state == PENDING]
        )

    # -- delivery

    def sweep(self) -> None:
        """
        Try every session that still has pending messages.  A session whose
        adapter raises is logged and skipped; it never stops the sweep.
        """
        for session in list(self._queues):
            try:
                self._kick(session)
            except Exception:
                _log.failure("Sweep of session {session!r} failed", session=session)
        self._pruneEvents()
        self._summarize()
        if self._leases is not None and self._loaded:
            # Messages other instances stored (and may not deliver: one
            # that died) are found here.
            self._journal.pendingSessions().addCallbacks(
                self._resync,
                lambda f: logFailure(_log, f, "Could not read the pending sessions"),
            )

    def _resync(self, pending: dict[str, tuple[int, int]]) -> None:
        for session, (count, _) in pending.items():
            queue = self._queues.setdefault(session, _SessionQueue())
            if queue.delivering is None:
                queue.count = max(queue.count, count)
            self._kick(session)

    def _renewLeases(self) -> Deferred[Any] | None:
        assert self._leases is not None
        if not self._leases.held:
            return None
        return self._leases.renew().addErrback(
            lambda f: logFailure(_log, f, "Could not renew the session leases")
        )

    def othersChanged(self) -> None:
        """
        Another instance committed something (with leases): the sessions
        whose lease it held are tried again.
        """
        for session, queue in list(self._queues.items()):
            if queue.leaseTaken:
                queue.leaseTaken = False
                self._kick(session)
            elif queue.claiming:
                queue.changedWhileClaiming = True

    def _claim(self, session: str, queue: _SessionQueue) -> None:
        assert self._leases is not None
        if queue.claiming:
            return
        queue.claiming = True
        queue.changedWhileClaiming = False

        def claimed(ok: bool) -> None:
            queue.claiming = False
            if self._queues.get(session) is not queue or not self._running:
                if ok:
                    self._release(session, queue, force=True)
                return
            if ok:
                queue.claimed = True
                # What was read before may have been delivered by another.
                self._forgetHead(queue)
                self._kick(session)
            elif queue.changedWhileClaiming:
                # The holder's release may be what was committed: its
                # notice came before this answer.
                queue.changedWhileClaiming = False
                self._kick(session)
            else:
                queue.leaseTaken = True

        def failed(failure: Failure) -> None:
            queue.claiming = False
            logFailure(_log, failure, "Could not claim session {session!r}", session=session)

        self._leases.claim(session).addCallbacks(claimed, failed)

    def _release(self, session: str, queue: _SessionQueue, force: bool = False) -> None:
        if self._leases is None or not (queue.claimed or force):
            return
        queue.claimed = False

        def failed(failure: Failure) -> None:
            # Closed while stopping: the lease expires by itself.
            if not failure.check(DatabaseClosed):
                logFailure(_log, failure, "Could not release session {session!r}", session=session)

        self._leases.release(session).addErrback(failed)

    def _logsEach(self) -> bool:
        """
        Whether the message at hand gets a log line of its own.
        """
        if self.logEachMessage:
            return True
        self._linesSince += 1
        return self._linesSince <= EACH_MESSAGE_LINES

    def _summarize(self) -> None:
        now = self._clock.seconds()
        since = self._summarizedAt
        if since is None or now - since < SUMMARY_INTERVAL:
            return
        self._summarizedAt = now
        queued, delivered = self._queuedSince, self._deliveredSince
        self._queuedSince = self._deliveredSince = self._linesSince = 0
        if queued or delivered:
            _log.info(
                "{queued} more message(s) queued and {delivered} delivered in"
                " the last {seconds:.0f} s than were logged one by one;"
                " {pending} pending",
                queued=queued,
                delivered=delivered,
                seconds=now - since,
                pending=self.pendingCount(),
            )

    def _pruneEvents(self) -> None:
        # At most once a minute (each prune is a write).
        now = self._clock.seconds()
        if self._lastPrune is not None and now - self._lastPrune < 60:
            return
        self._lastPrune = now
        prune = getattr(self._journal, "pruneEvents", None)
        if prune is not None:
            maybeDeferred(prune, now - self.eventRetention).addErrback(
                lambda f: logFailure(_log, f, "Could not prune old events")
            )

    def _kick(self, session: str) -> None:
        # Deliveries that complete synchronously come back here; loop rather
        # than recurse so a long queue cannot exhaust the stack.
        if session in self._kicking:
            self._kickAgain.add(session)
            return
        self._kicking.add(session)
        try:
            while True:
                self._kickAgain.discard(session)
                self._step(session)
                if session not in self._kickAgain:
                    break
        finally:
            self._kicking.discard(session)

    def _step(self, session: str) -> None:
        queue = self._queues.get(session)
        if queue is None or not self._running or not self._loaded:
            return
        if queue.delivering is not None or queue.retryCall is not None:
            return
        if queue.count <= 0:
            self._release(session, queue)
            if queue.idleWait is None and queue.reading is None and not queue.skipThrough:
                del self._queues[session]
            return
        if self._leases is not None and not queue.claimed:
            self._claim(session, queue)
            return
        if queue.head is None:
            self._readHead(session, queue)
            return
        woken, queue.woken = queue.woken, False
        if self._adapter.isBusy(session):
            # Woken by the idle Deferred yet still busy: the adapter's two
            # answers disagree; leave it to the sweep rather than spin.
            if not woken:
                self._waitForIdle(session, queue)
            return
        if queue.idleWait is not None:
            wait, queue.idleWait = queue.idleWait, None
            wait.cancel()
        self._deliver(session, queue, queue.head)

    def _readHead(self, session: str, queue: _SessionQueue) -> None:
        if queue.reading is not None:
            return
        generation = queue.generation
        d = maybeDeferred(self._journal.nextPending, session, queue.skipThrough)
        queue.reading = d

        def read(message: QueuedMessage | None) -> None:
            queue.reading = None
            if self._queues.get(session) is not queue:
                return
            if generation != queue.generation:
                self._kick(session)
                return
            if message is None:
                # The journal has nothing pending: the count was off.
                queue.count = 0
            elif message.id in self._discarding:
                return  # kicked again when the discard is written
            else:
                queue.head = message
            self._kick(session)

        def failed(failure: Failure) -> None:
            queue.reading = None
            logFailure(
                _log, failure, "Reading the next message of session {session!r} failed",
                session=session,
            )

        d.addCallbacks(read, failed)

    def _waitForIdle(self, session: str, queue: _SessionQueue) -> None:
        if queue.idleWait is not None:
            return
        wait = maybeDeferred(self._adapter.whenIdle, session)
        queue.idleWait = wait

        def idle(_: object) -> None:
            if queue.idleWait is wait:
                queue.idleWait = None
                queue.woken = True
                self._kick(session)

        def failed(failure: Failure) -> None:
            if queue.idleWait is wait:
                queue.idleWait = None
            if not failure.check(CancelledError):
                _log.failure(
                    "Waiting for session {session!r} to be idle failed",
                    failure,
                    session=session,
                )

        wait.addCallbacks(idle, failed)

    def _deliver(
        self, session: str, queue: _SessionQueue, message: QueuedMessage
    ) -> None:
        queue.delivering = message
        queue.startedAt = self._clock.seconds()
        logEvent = getattr(self._journal, "logEvent", None)
        if logEvent is not None:
            maybeDeferred(
                logEvent,
                EventKind.DELIVERY_STARTED,
                session,
                {
                    "message": message.id,
                    "attempt": message.attempts + 1,
                    "received": message.received,
                },
            ).addErrback(
                lambda f: logFailure(_log, f, "Could not record a delivery start")
            )
        cancelling = queue.cancelling = _Cancelling()
        delivery = attrs.evolve(
            message.delivery(),
            emit=self._emitter(session, message.id),
            cancelReason=lambda: cancelling.reason,
        )
        d = maybeDeferred(self._adapter.deliver, delivery)
        # Set before the callbacks are added: they clear it, even at once.
        queue.inFlight = d
        if self._deliveryTimeout is not None:
            self._timeOut(queue, d, self._deliveryTimeout)
        d.addCallbacks(
            self._delivered,
            self._failed,
            callbackArgs=(session, queue, message),
            errbackArgs=(session, queue, message),
        )
        d.addErrback(
            lambda f: logFailure(_log, f, "Delivery bookkeeping failed")
        )

    def _timeOut(self, queue: _SessionQueue, d: Deferred[Any], seconds: float) -> None:
        """
        Cancel the delivery C{d} if it takes longer than C{seconds}: it then
        fails with a L{TimeoutError}, whatever the adapter's cancellation
        raised.
        """
        cancelling = queue.cancelling
        timer = self._clock.callLater(seconds, self._cancel, queue, "timeout")

        def settled(result: object) -> object:
            if timer.active():
                timer.cancel()
            if cancelling.reason == "timeout" and isinstance(result, Failure):
                raise TimeoutError(f"the delivery took longer than {seconds:g} s")
            return result

        d.addBoth(settled)

    def _cancel(self, queue: _SessionQueue, reason: CancelReason) -> None:
        """
        Cancel the delivery in flight, if any, saying why first.
        """
        if queue.inFlight is not None:
            queue.cancelling.reason = reason
            queue.inFlight.cancel()

    def _emitter(self, session: str, messageId: int) -> Any:
        logEvent = getattr(self._journal, "logEvent", None)

        def emit(text: str) -> None:
            if logEvent is None:
                return
            maybeDeferred(
                logEvent,
                EventKind.DELIVERY_TEXT,
                session,
                {"message": messageId, "text": text},
            ).addErrback(lambda f: logFailure(_log, f, "Could not record streamed text"))

        return emit

    def _delivered(
        self, _: object, session: str, queue: _SessionQueue, message: QueuedMessage
    ) -> Deferred[None]:
        queue.inFlight = None
        self._noteDelivered(message, self._clock.seconds() - queue.startedAt)

        def recordFailed(failure: Failure) -> None:
            # The adapter has the message; at worst it sees it again after
            # a restart, with the same id.
            queue.skipThrough = max(queue.skipThrough, message.id)
            logFailure(_log, failure, "Could not record delivery of message {id}", id=message.id)

        def done(_: object) -> None:
            try:
                queue.count -= 1
                self._forgetHead(queue)
            finally:
                self._settled(session, queue)

        return (
            maybeDeferred(self._journal.markDelivered, message.id)
            .addErrback(recordFailed)
            .addCallback(done)
        )

    def _failed(
        self,
        failure: Failure,
        session: str,
        queue: _SessionQueue,
        message: QueuedMessage,
    ) -> Deferred[None] | None:
        queue.inFlight = None
        reason = queue.cancelling.reason
        if reason == "stop":
            # Stopped on purpose: the adapter has the message; it is not
            # retried, and counts as delivered.
            _log.info(
                "Delivery of message {id} to session {session!r} stopped",
                id=message.id,
                session=session,
                attempt=message.attempts + 1,
                duration=self._clock.seconds() - queue.startedAt,
            )
            return self._delivered(None, session, queue, message)
        if reason == "shutdown" or (not self._running and failure.check(CancelledError)):
            # Cancelled because chatweb is stopping: not the message's
            # fault; it stays pending for the next start.
            self._settled(session, queue)
            return None
        error = describeFailure(failure)
        attempts = message.attempts + 1
        final = attempts >= self._retry.maxAttempts
        _log.emit(
            LogLevel.error if final else LogLevel.warn,
            (
                "Message {id} to session {session!r} failed {attempt} times"
                " and is kept as failed: {error}"
                if final
                else "Delivery of message {id} to session {session!r} failed"
                " (attempt {attempt}): {error}"
            ),
            id=message.id,
            session=session,
            attempt=attempts,
            duration=self._clock.seconds() - queue.startedAt,
            error=error,
        )

        def recordFailed(f: Failure) -> None:
            logFailure(_log, f, "Could not record failure of message {id}", id=message.id)

        def recorded(_: object) -> None:
            try:
                if final:
                    queue.count -= 1
                # Read again: an older message retried while this one was
                # in flight goes first; this one's attempts are updated.
                self._forgetHead(queue)
                if not final and self._running:
                    # An adapter's error may say how long to wait at least
                    # (a model server's Retry-After).
                    after = getattr(failure.value, "retryAfter", None)
                    delay = self._retry.delay(attempts, self._rng)
                    if isinstance(after, (int, float)) and after > delay:
                        delay = float(after)
                    queue.retryCall = self._clock.callLater(
                        delay, self._retryNow, session
                    )
            finally:
                self._settled(session, queue)

        return (
            maybeDeferred(self._journal.recordFailure, message.id, error, final)
            .addErrback(recordFailed)
            .addCallback(recorded)
        )

    def _settled(self, session: str, queue: _SessionQueue) -> None:
        queue.delivering = None
        # Other instances may deliver the session's next message.
        self._release(session, queue)
        waiters, queue.stopWaiters = queue.stopWaiters, []
        for waiter in waiters:
            waiter.callback(None)
        self._maybeDrained()
        try:
            self._kick(session)
        finally:
            self._maybeEmpty()

    def stopSession(self, session: str) -> Deferred[bool]:
        """
        Stop the delivery in flight in C{session} (cancel its Deferred).  A
        stopped delivery is not a failure: it is recorded as delivered and
        not retried.  A message that waits to be retried after a failure is
        discarded instead, as chat.nvim's stop cancels its pending retry.

        @return: a Deferred firing with True once the stopped delivery is
            settled (or the waiting message discarded), or with False if
            there was neither.
        """
        queue = self._queues.get(session)
        if queue is None:
            return succeed(False)
        if queue.inFlight is None:
            if queue.retryCall is None or queue.delivering is not None:
                return succeed(False)
            return self._stopRetrying(session, queue)
        settled: Deferred[None] = Deferred()
        queue.stopWaiters.append(settled)
        self._cancel(queue, "stop")
        return settled.addCallback(lambda _: True)

    def _stopRetrying(self, session: str, queue: _SessionQueue) -> Deferred[bool]:
        """
        Discard the message of C{session} that waits for its retry.  Its
        retry timer keeps any delivery from starting while it is found.
        """

        def found(message: QueuedMessage | None) -> Deferred[bool] | bool:
            if message is None or queue.retryCall is None or not queue.retryCall.active():
                # Retried meanwhile: stop that delivery, if it is in flight.
                return self.stopSession(session) if queue.inFlight is not None else False
            _log.info(
                "Retries of message {id} to session {session!r} stopped: discarded",
                id=message.id,
                session=session,
            )
            # Nothing runs between these two: no delivery of it starts.
            queue.cancelRetry()
            return self._discard(message.id).addCallback(lambda _: True)

        return maybeDeferred(self._journal.nextPending, session, queue.skipThrough).addCallback(
            found
        )

    def _retryNow(self, session: str) -> None:
        queue = self._queues.get(session)
        if queue is not None:
            queue.retryCall = None
            self._kick(session)
