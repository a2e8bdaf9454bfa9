"""
chatweb.web._twisted_compat and chatweb._httpclient hold every private
Twisted name chatweb uses: these tests fail, naming it, when a Twisted
release changes one.
"""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource

from chatweb.web._twisted_compat import (
    PRIVATE_NAMES,
    HTTPChannelHooks,
    listeningDeferred,
    raiseListenErrorsSynchronously,
)


class _Endpoint:
    def __init__(self, result: Deferred) -> None:  # type: ignore[type-arg]
        self.result = result

    def listen(self, factory: object) -> Deferred:  # type: ignore[type-arg]
        return self.result


class PrivateNamesTests(SynchronousTestCase):
    def test_namesExist(self) -> None:
        service = StreamServerEndpointService(_Endpoint(succeed(None)), Factory())
        owners = {HTTPChannel: HTTPChannel(), StreamServerEndpointService: service}
        for owner, names in PRIVATE_NAMES.items():
            for name in names:
                self.assertTrue(
                    hasattr(owner, name) or hasattr(owners[owner], name),
                    f"Twisted's {owner.__name__} has no {name} any more:"
                    " update chatweb/_twisted_compat.py",
                )


class _Hooks(HTTPChannelHooks):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.continueAllowed = True

    def badRequest(self) -> None:
        self.calls.append("badRequest")
        super().badRequest()

    def shouldContinue(self) -> bool:
        self.calls.append("shouldContinue")
        return self.continueAllowed


class ChannelHooksTests(SynchronousTestCase):
    def connect(self) -> tuple[_Hooks, StringTransport]:
        channel = _Hooks()
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_badRequestHook(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"GARBAGE\r\n\r\n")
        self.assertEqual(channel.calls, ["badRequest"])
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))

    def test_continueHook(self) -> None:
        request = (
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
            b"Content-Length: 4\r\n\r\n"
        )
        channel, transport = self.connect()
        channel.dataReceived(request)
        self.assertEqual(channel.calls, ["shouldContinue"])
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        channel, transport = self.connect()
        channel.continueAllowed = False
        channel.dataReceived(request)
        self.assertEqual(channel.calls, ["shouldContinue"])
        self.assertEqual(transport.value(), b"")


class ServiceTests(SynchronousTestCase):
    def test_listenErrorsRaised(self) -> None:
        service = StreamServerEndpointService(
            _Endpoint(fail(CannotListenError("127.0.0.1", 1, OSError("busy")))), Factory()
        )
        raiseListenErrorsSynchronously(service)
        self.assertRaises(CannotListenError, service.privilegedStartService)

    def test_listeningDeferred(self) -> None:
        listening: Deferred[object] = Deferred()
        service = StreamServerEndpointService(_Endpoint(listening), Factory())
        self.assertIsNone(listeningDeferred(service))
        service.startService()
        self.assertIs(listeningDeferred(service), listening)


class _Hosts(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[object] = []

    def render_GET(self, request: object) -> bytes:
        self.seen.append(request.getHost())  # type: ignore[attr-defined]
        return b"ok"


class ChannelHostTests(SynchronousTestCase):
    def test_hostAskedOncePerConnection(self) -> None:
        """
        Every request of a keep-alive connection sees the address it came
        to, asked of the socket once for the connection (not once per
        request: a system call each).
        """
        from chatweb.web._site import ChatWebSite

        resource = _Hosts()
        site = ChatWebSite(resource)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 7777),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 5000),
        )
        asked: list[object] = []
        original = transport.getHost

        def getHost() -> object:
            asked.append(None)
            return original()

        transport.getHost = getHost  # type: ignore[method-assign]
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        for _ in range(3):
            channel.dataReceived(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertEqual(resource.seen, [IPv4Address("TCP", "127.0.0.1", 7777)] * 3)
        self.assertEqual(transport.value().count(b"200 OK"), 3)
        self.assertEqual(len(asked), 1)


class QuietPoolTests(TestCase):
    """
    chatweb/_httpclient.py: the pool of chatweb's requests to model servers.
    """

    def test_nameExists(self) -> None:
        from twisted.web.client import HTTPConnectionPool

        from chatweb._httpclient import PRIVATE_NAMES

        for name in PRIVATE_NAMES[HTTPConnectionPool]:
            self.assertTrue(
                hasattr(HTTPConnectionPool, name),
                f"Twisted's HTTPConnectionPool has no {name} any more:"
                " update chatweb/_httpclient.py",
            )

    async def test_requestsLogNothing(self) -> None:
        """
        A request through it logs no "Starting factory" / "Stopping
        factory" lines (Twisted's pool logs two for each connection).
        """
        import treq.client
        from twisted.internet import reactor
        from twisted.logger import formatEvent, globalLogPublisher
        from twisted.web.client import Agent
        from twisted.web.server import Site

        from chatweb._httpclient import quietPool

        class Hello(Resource):
            isLeaf = True

            def render_GET(self, request: object) -> bytes:
                return b"hello"

        site = Site(Hello())
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        logged: list[str] = []

        def observer(event: dict[str, object]) -> None:
            logged.append(formatEvent(event) or "")

        globalLogPublisher.addObserver(observer)  # type: ignore[arg-type]
        self.addCleanup(globalLogPublisher.removeObserver, observer)  # type: ignore[arg-type]
        client = treq.client.HTTPClient(Agent(reactor, pool=quietPool(reactor, persistent=False)))
        response = await client.get(f"http://127.0.0.1:{port.getHost().port}/")
        self.assertEqual(await response.content(), b"hello")
        self.assertEqual([line for line in logged if "factory" in line.lower()], [])
