"""
A real chatweb service on 127.0.0.1 for the length of one trial test:
L{startChatWeb}.
"""

from __future__ import annotations

import os
from typing import Any
import attrs
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from chatweb.client import ChatWebClient


@attrs.frozen
class RunningChatWeb:
    """
    A chatweb service listening for one test.

    @ivar url: its base URL, C{http://127.0.0.1:PORT}.
    @ivar client: a treq L{HTTPClient} that keeps no connection open (so the
        reactor is clean when the test ends).
    @ivar headers: the headers that authenticate a request.
    @ivar api: a L{ChatWebClient} for it (over C{client}).
    """

    service: Any
    url: str
    apiKey: str
    client: HTTPClient
    api: ChatWebClient

    @property
    def headers(self) -> dict[bytes | str, bytes | str]:
        return {"X-API-Key": self.apiKey}

    def post(self, session: str, content: str, **kwargs: Any) -> Deferred[Any]:
        """
        POST a message; fires with the treq response.
        """
        return self.client.post(
            self.url + "/",
            json={"session": session, "content": content},
            headers=self.headers,
            **kwargs,
        )

    def get(self, path: str, **kwargs: Any) -> Deferred[Any]:
        return self.client.get(self.url + path, headers=self.headers, **kwargs)


async def startChatWeb(
    testCase: TestCase,
    apiKey: str = "test-api-key",
    dataDir: str | None = None,
    **kwargs: Any,
) -> RunningChatWeb:
    """
    Start a L{ChatWebService} on a free port of 127.0.0.1, with its data in
    a temporary directory of C{testCase} unless C{dataDir} is given; it
    stops when the test ends.  C{kwargs} go to L{ChatWebService}.

    Use it from a trial test::

        async def test_post(self):
            chatweb = await startChatWeb(self, responder="echo")
            answer = await chatweb.api.ask("ci", "hello")
            self.assertEqual(answer.texts, ("hello",))
    """
    from twisted.internet import reactor

    from chatweb.service import ChatWebService

    if dataDir is None:
        dataDir = os.path.abspath(testCase.mktemp())
    os.makedirs(dataDir, exist_ok=True)
    service = ChatWebService(
        [apiKey], dataDir, endpoint="tcp:0:interface=127.0.0.1", **kwargs
    )
    service.startService()
    testCase.addCleanup(_stopChatWeb, service)
    assert service.listening is not None
    port = await service.listening
    await service.ready
    client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    url = f"http://127.0.0.1:{port.getHost().port}"
    return RunningChatWeb(service, url, apiKey, client, ChatWebClient(url, apiKey, http=client))


async def _stopChatWeb(service: Any) -> None:
    """
    Stop a service started by L{startChatWeb}, and close every connection
    to it, including those that treq's default (persistent) connection pool
    keeps open, so that trial finds the reactor clean.
    """
    import treq.api

    globalPool = treq.api.get_global_pool()
    if globalPool is not None:
        await globalPool.closeCachedConnections()
    await service.site.closeConnections()
    if service.running:
        await service.stopService()
    await service.site.closeConnections()
