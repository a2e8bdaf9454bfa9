"""
ChatWebService: the parts wired together, as one Twisted service.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.resource import IResource

from chatweb._twisted_compat import listeningDeferred, raiseListenErrorsSynchronously
from chatweb.api import ChatWebAPI, checkAPIKeys
from chatweb.backends.local import SCHEMA as SESSIONS_SCHEMA
from chatweb.backends.local import LocalBackend
from chatweb.backends.responders import makeResponder
from chatweb.config import ensureShareSecret
from chatweb.database import SQLiteDatabase
from chatweb.interfaces import IResponder, ISessionAdapter
from chatweb.journal import SCHEMA as JOURNAL_SCHEMA
from chatweb.journal import SQLiteJournal
from chatweb.queue import MessageQueue, RetryPolicy
from chatweb.limits import Limits
from chatweb.site import ChatWebSite, describeAddress

DATABASE_NAME = "chatweb.sqlite3"
DEFAULT_ENDPOINT = "tcp:7777:interface=127.0.0.1"

_log = Logger()


class ChatWebService(MultiService):
    """
    chatweb as a service: the journal and sessions in C{dataDir}, the queue
    delivering to C{adapter} (by default the local backend), and the API
    listening on C{endpoint}.

    Pass C{endpoint=None} to listen yourself: put L{resource} in your own
    L{Site} (or under a path of it) and add this service to your
    application so that the queue runs.

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
        shutdownTimeout: float = 10.0,
        exitOnFailure: bool = False,
        allowedHosts: Sequence[str] = (),
        shareLinks: bool = True,
        reactor: Any = None,
    ) -> None:
        super().__init__()
        # Before anything starts threads or writes files.
        checkAPIKeys(apiKeys)
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self._reactor = reactor
        self.dataDir = dataDir
        self.database = SQLiteDatabase(os.path.join(dataDir, DATABASE_NAME), reactor)
        self.journal = SQLiteJournal(self.database)
        if adapter is None:
            if isinstance(responder, str):
                responder = makeResponder(responder, reactor)
            adapter = LocalBackend(self.database, reactor, responder)
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
        )
        self.limits = limits
        self.shutdownTimeout = shutdownTimeout
        self.exitOnFailure = exitOnFailure
        self.api = ChatWebAPI(
            self.queue,
            adapter,
            apiKeys,
            limits=limits,
            clock=reactor,
            shareSecret=ensureShareSecret(dataDir) if shareLinks else None,
            allowedHosts=allowedHosts,
        )
        self.resource: IResource = self.api.resource()
        self.site = ChatWebSite(
            self.resource,
            limits=limits,
            accessLog=accessLog,
            refuseBeforeBody=self.api.refuseBeforeBody,
            reactor=reactor,
        )
        self.listening: Deferred[Any] | None = None
        if endpoint is not None:
            self._listener = StreamServerEndpointService(
                serverFromString(reactor, endpoint), self.site
            )
            raiseListenErrorsSynchronously(self._listener)
            self._listener.setServiceParent(self)
        else:
            self._listener = None
        self.ready: Deferred[None] = Deferred()

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
        # twistd binds ports here, before dropping privileges.
        with self._listenFailuresExit():
            super().privilegedStartService()

    def startService(self) -> None:
        def started(_: object) -> None:
            self.ready.callback(None)

        def failed(failure: Any) -> None:
            message = f"cannot start on the database in {self.dataDir}: {failure.getErrorMessage()}"
            if self.exitOnFailure:
                self._fatal(message)
            else:
                _log.failure("chatweb " + message, failure)
            self.ready.errback(failure)

        self.database.open(JOURNAL_SCHEMA + SESSIONS_SCHEMA).addCallback(
            lambda _: self.queue.start()
        ).addCallbacks(started, failed)
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
        self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        self._reactor.stop()

    def _announce(self, port: Any) -> Any:
        _log.info("chatweb listening on {where}", where=describeAddress(port.getHost()))
        return port

    def stopService(self) -> Deferred[None]:
        stopped = super().stopService() or succeed(None)
        stopped.addCallback(lambda _: self.queue.stop(self.shutdownTimeout))
        stopped.addCallback(lambda _: self.database.close())
        return stopped
