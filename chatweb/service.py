"""
ChatWebService: the parts wired together, as one Twisted service.
"""

from __future__ import annotations

import atexit
import os
import socket
import uuid
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource

from chatweb.web._twisted_compat import listeningDeferred, raiseListenErrorsSynchronously
from chatweb.web._api import ChatWebAPI, checkAPIKeys
from chatweb.backends.local import SCHEMA as SESSIONS_SCHEMA
from chatweb.backends.local import LocalBackend
from chatweb.backends.responders import makeResponder
from chatweb.config import DATABASE_NAME, dataDirWarning, ensureShareSecret, withBacklog
from chatweb._datalock import DataDirInUse, DataDirLock
from chatweb.store._postgresql import (
    LEASE_SCHEMA,
    Leases,
    PostgreSQLDatabase,
    SharedEvents,
    isPostgreSQL,
)
from chatweb.store._sqlite import SQLiteDatabase
from chatweb.interfaces import IResponder, ISessionAdapter
from chatweb.store._journal import SCHEMA as JOURNAL_SCHEMA
from chatweb.store._journal import SQLiteJournal
from chatweb.events import EventHub
from chatweb.model import Event
from chatweb.queue._queue import MessageQueue, RetryPolicy
from chatweb.limits import Limits
from chatweb.web._site import ChatWebSite, describeAddress
from chatweb.web._events import EventStreams
from chatweb.web._workers import PageWorkers
from chatweb.metrics import Metrics, MetricsResource
from twisted.web.server import Site
from chatweb.web._health import OK, STARTING, STOPPING, UNREACHABLE, HealthCheck

DEFAULT_ENDPOINT = "tcp:7777:interface=127.0.0.1:backlog=1024"
#: Route templates of request paths kept for the metrics (see _routeOf).
ROUTE_CACHE_SIZE = 1024

_log = Logger()


def _exitNonZero() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


class ChatWebService(MultiService):
    """
    chatweb as a service: the journal and sessions in C{dataDir}, the queue
    delivering to C{adapter} (by default the local backend), and the API
    listening on C{endpoint}.

    Pass C{endpoint=None} to listen yourself: put L{resource} in your own
    L{Site} (or under a path of it) and add this service to your
    application so that the queue runs.

    With C{pageWorkers=N} (C{twistd chatweb}'s default is 2), N child
    processes answer the requests that read sessions (pages, lists,
    exports, details, messages), so that this work never holds the
    reactor's GIL (L{chatweb.web._workers}); only for the default backend
    on SQLite.  With 0 (the default here), threads of this process do.

    Pages for browsers are served only to the Host names in C{allowedHosts}
    (loopback names always), against DNS rebinding; share links are signed
    with a secret kept in C{dataDir}.

    @ivar resource: the API's L{IResource}.
    @ivar queue: the L{MessageQueue}.
    @ivar adapter: the L{ISessionAdapter} in use.
    @ivar site: the L{ChatWebSite} serving C{resource}.
    """

    def __init__(
        self,
        apiKeys: Sequence[str],
        dataDir: str,
        endpoint: str | None = DEFAULT_ENDPOINT,
        adapter: ISessionAdapter | None = None,
        responder: IResponder | str = "none",
        interval: float = 5.0,
        retry: RetryPolicy = RetryPolicy(),
        deliveryTimeout: float | None = 600.0,
        limits: Limits = Limits(),
        accessLog: bool = False,
        logEachMessage: bool = False,
        shutdownTimeout: float = 10.0,
        exitOnFailure: bool = False,
        allowedHosts: Sequence[str] = (),
        shareLinks: bool = True,
        reactor: Any = None,
        metricsEndpoint: str | None = None,
        database: str | None = None,
        databasePassword: str | None = None,
        leaseTTL: float = 15.0,
        pageWorkers: int = 0,
    ) -> None:
        super().__init__()
        # Before anything starts threads or writes files.
        checkAPIKeys(apiKeys)
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self._reactor = reactor
        self._routes: dict[tuple[str, str], str | None] = {}
        self._urls: Any = None
        self.dataDir = dataDir
        self.database: SQLiteDatabase
        if database is not None:
            # A postgresql:// DSN: the store shared with other instances
            # (see docs/deploy.md).
            if not isPostgreSQL(database):
                raise ValueError("database must be a postgresql:// DSN")
            self.database = PostgreSQLDatabase(database, reactor, databasePassword)
            self._where = f"the database {self.database.path}"
        else:
            self.database = SQLiteDatabase(os.path.join(dataDir, DATABASE_NAME), reactor)
            self._where = f"the database in {dataDir}"
        #: With SQLite, held while the service runs (see L{DataDirLock}).
        self._dataLock = None if database is not None else DataDirLock(dataDir)
        #: Every change, published once committed (see L{EventHub}).
        self.events = EventHub()
        #: The changes this instance made (what its metrics count): all of
        #: L{events}, unless other instances share the store.
        self.ownEvents = self.events
        sink: Callable[[Event], None] = self.events.publish
        #: With PostgreSQL: the leases on sessions, and the events of every
        #: instance (LISTEN/NOTIFY), in id order.
        self.leases: Leases | None = None
        self.sharedEvents: SharedEvents | None = None
        if isinstance(self.database, PostgreSQLDatabase):
            self.leases = Leases(
                self.database,
                f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
                leaseTTL,
            )
            self.sharedEvents = SharedEvents(
                self.database,
                lambda after: self.journal.eventsSince(after),
                self.events.publish,
                reactor,
                wanted=lambda: self.events.subscriberCount() > 0,
            )
            self.ownEvents = EventHub()
            sink = self._ownEvent
        self.journal = SQLiteJournal(self.database, now=reactor.seconds, eventSink=sink)
        self._ownsAdapter = adapter is None
        if adapter is None:
            if isinstance(responder, str):
                responder = makeResponder(responder, reactor)
            adapter = LocalBackend(self.database, reactor, responder, eventSink=sink)
        self.adapter = adapter
        self.queue = MessageQueue(
            self.journal,
            adapter,
            reactor,
            interval=interval,
            retry=retry,
            deliveryTimeout=deliveryTimeout,
            maxPendingPerSession=limits.maxPendingPerSession,
            maxPendingTotal=limits.maxPendingTotal,
            leases=self.leases,
            logEachMessage=logEachMessage,
            # Its own backend keeps sessions in the journal's database:
            # delivered in the write that stores them, when nothing else is
            # pending.  (A backend a program passes has a database of its
            # own.)
            recorder=(
                adapter.recorder
                if self._ownsAdapter and isinstance(adapter, LocalBackend)
                else None
            ),
        )
        if self.sharedEvents is not None:
            self.sharedEvents.onChange = self.queue.othersChanged
        self.limits = limits
        self._shareLinks = shareLinks
        #: The tables to create: the local backend's only when it is in use.
        self._schema = JOURNAL_SCHEMA + (SESSIONS_SCHEMA if self._ownsAdapter else [])
        if self.leases is not None:
            self._schema = self._schema + LEASE_SCHEMA
        self.shutdownTimeout = shutdownTimeout
        self.exitOnFailure = exitOnFailure
        self.api = ChatWebAPI(
            self.queue,
            adapter,
            apiKeys,
            limits=limits,
            clock=reactor,
            # Read (or created) when the service starts, not here.
            shareSecret=None,
            allowedHosts=allowedHosts,
        )
        #: Read when the service starts.
        self._shareSecret: bytes | None = None
        if (
            pageWorkers
            and self._ownsAdapter
            and not isinstance(self.database, PostgreSQLDatabase)
        ):
            # Pages read and rendered in other processes (another GIL).
            self.api.usePageWorkers(
                PageWorkers(reactor, self.database.path, pageWorkers, lambda: self._shareSecret)
            )
        # Live events and health (chatweb/web/_events.py, _health.py).
        self.api.live = EventStreams(self.events, self.journal, reactor)
        self.api.health = HealthCheck(self._health)
        self.resource: IResource = self.api.resource()
        self.site = ChatWebSite(
            self.resource,
            limits=limits,
            accessLog=accessLog,
            refuseBeforeBody=self.api.refuseBeforeBody,
            reactor=reactor,
        )
        # Metrics (chatweb/metrics.py): GET /metrics with the key, and on
        # metricsEndpoint without it.
        self.metrics = Metrics(
            self.ownEvents, self.queue.pendingCount, self.api.live.openCount, self._routeOf
        )
        self.api.metrics = self.metrics
        self.site.requestObservers.append(self.metrics.observeRequest)
        if metricsEndpoint is not None:
            metricsSite = Site(MetricsResource(self.metrics))
            metricsSite.displayTracebacks = False
            metricsListener = StreamServerEndpointService(
                serverFromString(reactor, metricsEndpoint), metricsSite
            )
            raiseListenErrorsSynchronously(metricsListener)
            metricsListener.setServiceParent(self)
        self.listening: Deferred[Any] | None = None
        self._listener: StreamServerEndpointService | None
        if endpoint is not None:
            self._listener = StreamServerEndpointService(
                serverFromString(reactor, withBacklog(endpoint)), self.site
            )
            raiseListenErrorsSynchronously(self._listener)
            self._listener.setServiceParent(self)
        else:
            self._listener = None
        self._stopped = False
        self._privilegedStarted = False
        self._shareSecretRead = False
        #: What startService came to: None while starting, True once ready,
        #: or the Failure it stopped on.
        self._readyResult: bool | Failure | None = None
        self._readyWaiters: list[Deferred[None]] = []

    @property
    def ready(self) -> Deferred[None]:
        """
        A new Deferred that fires once the database is open and the queue
        runs (or fails with the reason it could not start).  Each access
        gives a new one, so an error nobody waits for is not left in a
        Deferred.
        """
        if self._readyResult is True:
            return succeed(None)
        if isinstance(self._readyResult, Failure):
            return fail(self._readyResult)
        waiter: Deferred[None] = Deferred()
        self._readyWaiters.append(waiter)
        return waiter

    def _settleReady(self, result: bool | Failure) -> None:
        self._readyResult = result
        waiters, self._readyWaiters = self._readyWaiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    @contextmanager
    def _listenFailuresExit(self) -> Iterator[None]:
        """
        Under twistd (C{exitOnFailure}), a port that cannot be listened on
        ends the process with one line; embedded, the error is raised.
        """
        try:
            yield
        except Exception as e:
            if not self.exitOnFailure:
                raise
            raise SystemExit(f"chatweb: cannot listen: {e}")

    def privilegedStartService(self) -> None:
        # twistd binds ports here, before dropping privileges.  The twistd
        # plugin calls it early (before twistd daemonizes), so it may be
        # called twice: the second call does nothing.
        if self._privilegedStarted:
            return
        self._refuseRestart()
        self._readShareSecret()
        self._privilegedStarted = True
        with self._listenFailuresExit():
            super().privilegedStartService()

    def _readShareSecret(self) -> None:
        """
        Read the share secret of the data directory, or create it (as
        root under twistd, before privileges are dropped, when the plugin
        calls privilegedStartService first).  Once per service.
        """
        if self._shareLinks and not self._shareSecretRead:
            self._shareSecret = ensureShareSecret(self.dataDir)
            self.api.useShareSecret(self._shareSecret)
            self._shareSecretRead = True

    def _refuseRestart(self) -> None:
        if self._stopped:
            raise RuntimeError(
                "a stopped ChatWebService cannot be started again (its database"
                " is closed): make a new ChatWebService"
            )

    def startService(self) -> None:
        """
        Open the database, start the queue and listen.  A service runs once:
        after stopService, startService raises RuntimeError.
        """
        self._refuseRestart()
        try:
            self._readShareSecret()
        except Exception:
            # Whoever waits for ready hears of it too.
            self._settleReady(Failure())
            raise
        warning = dataDirWarning(self.dataDir)
        if warning is not None:
            # Not a field named "warning": trial takes such an event for a
            # Python warning (and fails on its missing "filename").
            _log.warn("chatweb: {problem}", problem=warning)

        def started(_: object) -> None:
            _log.info("chatweb started on {where}", where=self._where)
            self._settleReady(True)

        def failed(failure: Failure) -> None:
            if self.exitOnFailure:
                self._fatal(
                    f"cannot start on {self._where}:"
                    f" {failure.getErrorMessage()}"
                )
            else:
                _log.failure(
                    "chatweb cannot start on {where}",
                    failure,
                    where=self._where,
                )
            self._settleReady(failure)

        try:
            if self._dataLock is not None:
                self._dataLock.acquire()
        except DataDirInUse as e:
            opened: Deferred[Any] = fail(DataDirInUse(
                f"{e}: one data directory serves one chatweb at a time"
                " (several instances share a PostgreSQL database: --database)"
            ))
        except OSError:
            opened = fail(Failure())
        else:
            opened = self.database.open(self._schema)
        shared = self.sharedEvents
        if shared is not None:
            opened.addCallback(lambda _: shared.start())
        opened.addCallback(lambda _: self.queue.start())
        workers = self.api.pageWorkers
        if workers is not None:
            # Ready before the first page is asked for (a worker takes about
            # half a second to import what it needs).
            opened.addCallback(lambda _: workers.start())
        opened.addCallbacks(started, failed)
        self._privilegedStarted = True
        with self._listenFailuresExit():
            super().startService()
        if self._listener is not None:
            self.listening = listeningDeferred(self._listener)
            if self.listening is not None:
                self.listening.addCallback(self._announce)

    def _fatal(self, message: str) -> None:
        """
        Under twistd: say what is wrong in one line and exit non-zero.
        """
        print(f"chatweb: {message}", file=sys.stderr, flush=True)
        # The exit status is set at the very end, after twistd has shut
        # down and removed its pidfile.
        atexit.register(_exitNonZero)
        # (At once if it runs; under twistd a failure found in startService
        # comes before the reactor runs.)
        self._reactor.callWhenRunning(self._reactor.stop)

    def _announce(self, port: Any) -> Any:
        _log.info("chatweb listening on {where}", where=describeAddress(port.getHost()))
        return port

    def _ownEvent(self, event: Event) -> None:
        # With other instances (PostgreSQL): an event this instance
        # committed, told by its journal.
        assert self.sharedEvents is not None
        self.ownEvents.publish(event)
        self.sharedEvents.changed(event)

    def _routeOf(self, request: Any) -> str | None:
        """
        The route template a request went to (for metrics), or None.
        """
        segments = list(request.prepath or []) + list(request.postpath or [])
        mount = self.site.mount
        if segments[: len(mount)] != mount:
            return None
        path = "/" + "/".join(
            s.decode("utf-8", "replace") for s in segments[len(mount) :]
        )
        method = request.method.decode("ascii", "replace")
        # Matching again costs about as much as Klein's own routing: the
        # answers for the paths seen last are kept (a bounded number: paths
        # hold session ids).
        key = (path, method)
        if key in self._routes:
            return self._routes[key]
        if self._urls is None:
            self._urls = self.api.app.url_map.bind("localhost")
        try:
            rule, _ = self._urls.match(path, method=method, return_rule=True)
        except Exception:
            route = None
        else:
            route = str(rule.rule)
        if len(self._routes) >= ROUTE_CACHE_SIZE:
            self._routes.clear()
        self._routes[key] = route
        return route

    def _health(self) -> str:
        if self._stopped:
            return STOPPING
        if self._readyResult is not True:
            return STARTING
        return OK if self.database.reachable else UNREACHABLE

    def stopService(self) -> Deferred[None]:
        self._stopped = True
        # Event streams end cleanly (a client reconnects with Last-Event-ID).
        self.api.live.closeAll()
        stopped = super().stopService() or succeed(None)
        stopped.addCallback(lambda _: self.queue.stop(self.shutdownTimeout))
        shared = self.sharedEvents
        if shared is not None:
            stopped.addCallback(lambda _: shared.stop())
        workers = self.api.pageWorkers
        if workers is not None:
            stopped.addCallback(lambda _: workers.stop())
        stopped.addCallback(lambda _: self.database.close())
        lock = self._dataLock
        if lock is not None:

            def release(result: object) -> object:
                lock.release()
                return result

            stopped.addBoth(release)
        return stopped
