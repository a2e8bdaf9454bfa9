"""
chatweb entirely in memory, for unit tests driven by
L{twisted.internet.task.Clock}: L{chatWebInMemory}.
"""

from __future__ import annotations

from typing import Any

import attrs
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from chatweb.client import ChatWebClient
from chatweb.interfaces import ISessionAdapter
from chatweb.queue import MessageQueue
from chatweb.store._memory import MemoryJournal
from chatweb.testing._adapter import MemoryAdapter


@attrs.frozen
class InMemoryChatWeb:
    """
    chatweb's routes over an in-memory queue, journal and adapter, all on
    one L{Clock}: nothing listens, nothing waits on real time.

    @ivar client: a L{ChatWebClient} whose requests go straight to the
        routes (through L{StubTreq}); its retries wait on C{clock} too.
    @ivar adapter: the sessions (a L{MemoryAdapter} unless another was
        given).
    @ivar clock: advance it to step the queue's sweep (every C{interval}
        seconds) and retries.
    """

    client: ChatWebClient
    adapter: Any
    queue: MessageQueue
    journal: MemoryJournal
    clock: Clock
    apiKey: str
    stub: StubTreq

    def run(self, coroutine: Any) -> Any:
        """
        The result of a client call, which completes at once in memory
        (for a L{SynchronousTestCase}: C{chatweb.run(chatweb.client.send(...))}).

        @raise AssertionError: if it is still waiting (on the clock, say: a
            retry after a 503); await it and advance the clock instead.
        """
        d = Deferred.fromCoroutine(coroutine)
        results: list[Any] = []
        d.addBoth(results.append)
        if not results:
            d.cancel()
            raise AssertionError("the call is still waiting (advance the clock?)")
        result = results[0]
        if hasattr(result, "raiseException"):
            result.raiseException()
        return result


def chatWebInMemory(
    testCase: SynchronousTestCase,
    adapter: ISessionAdapter | None = None,
    clock: Clock | None = None,
    apiKey: str = "test-api-key",
    interval: float = 5.0,
    **kwargs: Any,
) -> InMemoryChatWeb:
    """
    chatweb with its queue started, in memory, on C{clock} (a new L{Clock}
    by default), for one test; stopped when the test ends.  C{kwargs} go to
    L{ChatWebAPI} (C{limits=...}, C{shareSecret=...}).

        def test_busySession(self):
            chatweb = chatWebInMemory(self)
            chatweb.adapter.setBusy("ci")
            chatweb.run(chatweb.client.send("ci", "hello"))
            chatweb.adapter.setBusy("ci", False, notify=False)
            chatweb.clock.advance(5)        # the sweep delivers it
            self.assertEqual(chatweb.adapter.contents("ci"), ["hello"])

    Event streams need a listening server (L{startChatWeb}).
    """
    from chatweb.web import ChatWebAPI

    clock = Clock() if clock is None else clock
    adapter = MemoryAdapter() if adapter is None else adapter
    journal = MemoryJournal(now=clock.seconds)
    # The queue enforces the pending limits, as the service's does.
    limits = kwargs.get("limits")
    pending = {} if limits is None else {
        "maxPendingPerSession": limits.maxPendingPerSession,
        "maxPendingTotal": limits.maxPendingTotal,
    }
    queue = MessageQueue(journal, adapter, clock, interval=interval, **pending)
    queue.start()
    testCase.addCleanup(queue.stop)
    api = ChatWebAPI(queue, adapter, [apiKey], clock=clock, **kwargs)
    stub = StubTreq(api.resource())
    client = ChatWebClient("http://127.0.0.1", apiKey, http=stub, clock=clock, timeout=None)
    return InMemoryChatWeb(client, adapter, queue, journal, clock, apiKey, stub)
