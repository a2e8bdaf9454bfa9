"""
GET /metrics (prometheus-client), with the key and on --metrics-listen.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatweb.events import EventHub
from chatweb.metrics import Metrics
from chatweb.model import Event, EventKind
from chatweb.testing import startChatWeb


def sample(text: str, name: str) -> float | None:
    """
    The value of the sample C{name} (with its labels, as written) in C{text}.
    """
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


class MetricsTests(TestCase):
    async def test_requestsDeliveriesAndQueue(self) -> None:
        """
        After a message is posted and delivered, the metrics count the
        request by route template and status, the delivery, and its latency;
        nothing is pending.
        """
        chatweb = await startChatWeb(self, responder="echo")
        response = await chatweb.post("ci", "hello")
        self.assertEqual(response.code, 204)
        await response.content()
        while chatweb.service.metrics.deliveries._value.get() < 1:
            await deferLater(reactor, 0.01, lambda: None)
        response = await chatweb.get("/queue/12345678/retry")
        await response.content()
        response = await chatweb.get("/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(
            response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
        )
        text = (await response.content()).decode("utf-8")
        self.assertEqual(
            sample(text, 'chatweb_http_requests_total{method="POST",route="/",status="204"}'),
            1.0,
        )
        # A path that is no route (for this method) is counted apart.
        self.assertEqual(
            sample(
                text,
                'chatweb_http_requests_total{method="GET",route="unmatched",status="404"}',
            ),
            1.0,
        )
        self.assertEqual(sample(text, "chatweb_deliveries_total"), 1.0)
        self.assertEqual(sample(text, "chatweb_delivery_wait_seconds_count"), 1.0)
        self.assertEqual(sample(text, "chatweb_delivery_duration_seconds_count"), 1.0)
        self.assertEqual(sample(text, "chatweb_queue_pending"), 0.0)
        self.assertEqual(sample(text, "chatweb_sse_streams"), 0.0)
        self.assertEqual(sample(text, "chatweb_dead_letters_total"), 0.0)

    async def test_needsTheKey(self) -> None:
        chatweb = await startChatWeb(self)
        response = await chatweb.client.get(chatweb.url + "/metrics")
        self.assertEqual(response.code, 401)
        await response.content()

    async def test_metricsListen(self) -> None:
        """
        With metricsEndpoint, the metrics are served there without the key,
        and nothing else is.
        """
        from twisted.internet.endpoints import TCP4ServerEndpoint

        chatweb = await startChatWeb(
            self, metricsEndpoint="tcp:0:interface=127.0.0.1"
        )
        ports = [
            s._waitingForPort.result
            for s in chatweb.service
            if getattr(s, "_waitingForPort", None) is not None
        ]
        urls = {f"http://127.0.0.1:{p.getHost().port}" for p in ports} - {chatweb.url}
        self.assertEqual(len(urls), 1)
        url = urls.pop()
        response = await chatweb.client.get(url + "/metrics")
        self.assertEqual(response.code, 200)
        self.assertIn(b"chatweb_queue_pending", await response.content())
        response = await chatweb.client.get(url + "/sessions")
        self.assertEqual(response.code, 404)
        await response.content()
        del TCP4ServerEndpoint

    def test_twoServicesDoNotClash(self) -> None:
        """
        Each service has its own registry: two in one process count apart.
        """
        first = Metrics(EventHub(), lambda: 0, lambda: 0, lambda r: None)
        hub = EventHub()
        second = Metrics(hub, lambda: 3, lambda: 1, lambda r: None)
        hub.publish(Event(1, EventKind.DELIVERY_STARTED, "s", 10.0, {"message": 5, "received": 4.0}))
        hub.publish(Event(2, EventKind.DELIVERY_FAILED, "s", 12.5, {"message": 5, "final": True}))
        text = second.exposition().decode()
        self.assertEqual(sample(text, "chatweb_delivery_failures_total"), 1.0)
        self.assertEqual(sample(text, "chatweb_dead_letters_total"), 1.0)
        self.assertEqual(sample(text, "chatweb_queue_pending"), 3.0)
        self.assertEqual(sample(text, "chatweb_sse_streams"), 1.0)
        self.assertEqual(sample(text, "chatweb_delivery_wait_seconds_sum"), 6.0)
        self.assertEqual(sample(text, "chatweb_delivery_duration_seconds_sum"), 2.5)
        self.assertEqual(
            sample(first.exposition().decode(), "chatweb_delivery_failures_total"), 0.0
        )


class _Request:
    def __init__(self, method: bytes, path: bytes) -> None:
        self.method = method
        self.prepath: list[bytes] = []
        self.postpath = path[1:].split(b"/")


class RouteTests(TestCase):
    async def test_routeTemplatesOfManyPaths(self) -> None:
        """
        Requests are counted by route template and method: the same path
        under another method is another answer, and many distinct paths
        (session ids, message ids) keep their templates while the answers
        kept for them stay bounded.
        """
        from chatweb.service import ROUTE_CACHE_SIZE

        service = (await startChatWeb(self)).service
        routeOf = service._routeOf
        retry = routeOf(_Request(b"POST", b"/queue/1/retry"))
        self.assertIsNotNone(retry)
        self.assertIn("retry", retry)
        self.assertIsNone(routeOf(_Request(b"GET", b"/queue/1/retry")))
        self.assertEqual(routeOf(_Request(b"POST", b"/queue/1/retry")), retry)
        for n in range(ROUTE_CACHE_SIZE * 3):
            self.assertEqual(routeOf(_Request(b"POST", b"/queue/%d/retry" % n)), retry)
        self.assertLessEqual(len(service._routes), ROUTE_CACHE_SIZE)
        self.assertEqual(routeOf(_Request(b"POST", b"/")), "/")
