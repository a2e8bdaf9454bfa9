"""
Prometheus metrics of one chatweb service, in a registry of its own (several
services in one process do not share counters): HTTP requests by route and
status, queue depth, deliveries, failures, dead letters, delivery latency
and open event streams.  Deliveries are counted from the L{EventHub}'s
events, the gauges are read when the metrics are collected.

Served by C{GET /metrics} (with the key) and, with C{--metrics-listen}, on
an endpoint of its own (without the key: bind it where only the scraper
reaches it).
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from chatweb.events import EventHub
from chatweb.model import Event, EventKind

_METHODS = {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"}
#: Seconds: from a 204 to the deliver call (a queue may wait long) ...
_WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600)
#: ... and of the deliver call itself (a model's answer).
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """
    The metrics of one service.

    @param pending: gives the number of messages waiting (queue depth).
    @param streams: gives the number of open event streams.
    @param route: gives a finished request's route template (e.g.
        C{/queue/<int:messageId>}), or None for a path that is no route.
    """

    def __init__(
        self,
        hub: EventHub,
        pending: Callable[[], int],
        streams: Callable[[], int],
        route: Callable[[IRequest], str | None],
    ) -> None:
        self.registry = CollectorRegistry()
        self._route = route
        self.requests = Counter(
            "chatweb_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.deliveries = Counter(
            "chatweb_deliveries", "Messages delivered to their session", registry=self.registry
        )
        self.failures = Counter(
            "chatweb_delivery_failures",
            "Failed deliveries (each attempt)",
            registry=self.registry,
        )
        self.deadLetters = Counter(
            "chatweb_dead_letters",
            "Messages kept as failed after their last attempt",
            registry=self.registry,
        )
        self.wait = Histogram(
            "chatweb_delivery_wait_seconds",
            "Seconds from a message's 204 to its deliver call",
            buckets=_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "chatweb_delivery_duration_seconds",
            "Seconds a deliver call took (done or failed)",
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        queueDepth = Gauge(
            "chatweb_queue_pending",
            "Messages accepted and not yet delivered (nor failed for good)",
            registry=self.registry,
        )
        queueDepth.set_function(pending)
        openStreams = Gauge(
            "chatweb_sse_streams", "Open event streams", registry=self.registry
        )
        openStreams.set_function(streams)
        #: When each delivery in flight started, by message id (one per
        #: session at most).
        self._started: dict[int, float] = {}
        self.unsubscribe = hub.subscribe(self._event)

    def _event(self, event: Event) -> None:
        message = event.data.get("message")
        if event.kind is EventKind.DELIVERY_STARTED:
            received = event.data.get("received")
            if isinstance(received, (int, float)):
                self.wait.observe(max(0.0, event.time - received))
            if isinstance(message, int):
                self._started[message] = event.time
        elif event.kind is EventKind.DELIVERY_DONE:
            self.deliveries.inc()
            self._finished(message, event.time)
        elif event.kind is EventKind.DELIVERY_FAILED:
            self.failures.inc()
            if event.data.get("final"):
                self.deadLetters.inc()
            self._finished(message, event.time)

    def _finished(self, message: Any, time: float) -> None:
        started = self._started.pop(message, None) if isinstance(message, int) else None
        if started is not None:
            self.duration.observe(max(0.0, time - started))

    def observeRequest(self, request: IRequest) -> None:
        """
        Count a finished request.
        """
        route = self._route(request) or "unmatched"
        method = request.method if request.method in _METHODS else b"other"
        code = getattr(request, "code", 0)
        self.requests.labels(route, method.decode("ascii"), str(code)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def render(self, request: IRequest) -> bytes:
        """
        Answer C{GET /metrics}: the text exposition format.
        """
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return self.exposition()


class MetricsResource(Resource):
    """
    The metrics alone, for C{--metrics-listen}: C{GET /metrics} (any other
    path is a 404).  No key: listen where only the scraper can reach.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD") or request.postpath != [b"metrics"]:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"application/json")
            return b'{"error": "not found"}'
        return self._metrics.render(request)
