"""
The HTTP API: chat.nvim's routes over Klein.

Every request must carry a valid X-API-Key, except one: C{GET /session}
with a share link's token.  Errors are JSON objects C{{"error": "..."}} that
say what was wrong.  Only the routes below exist: any other method or path
is a 404.

HTML pages (C{GET /session}, and C{GET /sessions} asking for C{text/html})
are only served to a Host that is allowed (DNS rebinding).

The routes' handlers live in a module per resource: messages and the queue
in L{chatweb.web._messages}, pages, the export and share links in
L{chatweb.web._pages}, the session API in L{chatweb.web._sessionapi}.
"""

from __future__ import annotations

from functools import cached_property
import hmac
from typing import Any, Sequence, cast
from weakref import WeakKeyDictionary

from klein import Klein
from twisted.internet.defer import CancelledError, DeferredSemaphore, FirstError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import IntegerConverter, RequestRedirect

from chatweb.web._hosts import LOOPBACK_HOSTS, hostName, normalizeAllowedHost
from chatweb.interfaces import ISessionAdapter
from chatweb.limits import Limits, RateLimiter, retryAfter
from chatweb.queue._queue import MessageQueue
from chatweb.web._share import InvalidToken, ShareLinks
from chatweb.web._sessionapi import SessionAPI
from chatweb.web._throttle import FailureThrottle, clientKey
from chatweb.web._errors import _REASONS, _error, _notFound, _throttledMessage
from chatweb.web._guard import UNAUTHORIZED, _Guard, checkAPIKeys, credentials, hasCredentials
from chatweb.web._messages import Messages
from chatweb.web._workers import PageWorkers
from chatweb.web._pages import INDEX_SCOPE, RENDER_THREADS, Pages, _sessionIdArgument
from chatweb.web._site import Refusal
from chatweb.store._unreachable import logFailure
from chatweb.web._validation import (
    BadRequest,
    parseMessage,
    validateSessionId,
)

_log = Logger()


class _AsciiInteger(IntegerConverter):
    """
    werkzeug's C{int} converter, for ASCII digits only (C{\\d} and C{int()}
    take any Unicode digit: C{/queue/١} would be message 1).
    """

    regex = r"[0-9]+"


__all__ = [
    "ChatWebAPI",
    "BadRequest",
    "LOOPBACK_HOSTS",
    "hostName",
    "normalizeAllowedHost",
    "parseMessage",
    "validateSessionId",
]


class ChatWebAPI:
    """
    The routes, over a L{MessageQueue} (for posting) and an
    L{ISessionAdapter} (for reading sessions).
    """

    app = Klein()
    app.url_map.converters["int"] = _AsciiInteger

    def __init__(
        self,
        queue: MessageQueue,
        adapter: ISessionAdapter,
        apiKeys: Sequence[str],
        limits: Limits = Limits(),
        clock: IReactorTime | None = None,
        shareSecret: bytes | None = None,
        allowedHosts: Sequence[str] | None = None,
    ) -> None:
        """
        @param shareSecret: the server secret that signs share links (see
            L{chatweb.config.ensureShareSecret}); None turns share links off.
        @param allowedHosts: host names (no port) that pages are served to,
            besides L{LOOPBACK_HOSTS}, which always are; C{"*"} allows any.
        """
        keys = checkAPIKeys(apiKeys)
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        self._clock = clock
        self._renders = DeferredSemaphore(RENDER_THREADS)
        #: Processes that read and render pages (L{PageWorkers}); None:
        #: threads of this process do.
        self.pageWorkers: PageWorkers | None = None
        #: Requests let in without a key, by the expiry of their verified
        #: share token.
        self._shareExpiry: WeakKeyDictionary[IRequest, int] = WeakKeyDictionary()
        self._shareLinks = ShareLinks(shareSecret, clock) if shareSecret is not None else None
        self._allowedHosts = frozenset(LOOPBACK_HOSTS) | {
            normalizeAllowedHost(name) for name in (allowedHosts or ())
        }
        self._queue = queue
        self._adapter = adapter
        self._keys = keys
        self._limits = limits
        self._rateLimiter = RateLimiter(limits.rateLimit, limits.rateBurst, clock)
        #: Failed authentications, per client address.
        self._authFailures = FailureThrottle(clock)

    def usePageWorkers(self, workers: PageWorkers) -> None:
        """
        Read and render in C{workers}' processes from now on, a request at
        a time per worker (the others wait their turn, as for threads).
        """
        self.pageWorkers = workers
        self._renders = DeferredSemaphore(workers.processes)

    def useShareSecret(self, shareSecret: bytes) -> None:
        """
        Sign share links with C{shareSecret} from now on (for a service that
        reads its secret when it starts, not when it is built).
        """
        self._shareLinks = ShareLinks(shareSecret, self._clock)

    def resource(self) -> IResource:
        """
        The L{IResource} that serves the API.
        """
        return _Guard(self, self.app.resource())

    # -- guards

    def headersAuthorized(self, headers: Any) -> bool:
        """
        Whether request headers carry one of our keys (for the site, which
        refuses bodies without one before reading them).
        """
        return self._keyIn(headers) is not None

    def refuseBeforeBody(self, request: IRequest) -> Refusal | None:
        """
        For L{chatweb.web._site.ChatWebSite}: C{(code, reason, message)} to
        refuse a request whose body is not read yet (its client is
        throttled, or it carries no valid key), else None.
        """
        client = clientKey(request.getClientAddress())
        wait = self._authFailures.wait(client)
        if wait:
            headers = [(b"Retry-After", retryAfter(wait))]
            return 429, _REASONS[429], _throttledMessage(wait), headers
        if self._authorized(request) is not None:
            return None
        if hasCredentials(request.requestHeaders):
            self._authFailures.failed(client)
        return 401, b"Unauthorized", UNAUTHORIZED

    def _refuseThrottled(self, request: IRequest, client: str) -> bytes | None:
        """
        A 429 if C{client} has failed to authenticate too often, else None.
        """
        wait = self._authFailures.wait(client)
        if not wait:
            return None
        request.setHeader(b"Retry-After", retryAfter(wait))
        return _error(request, 429, _throttledMessage(wait))

    def _authorized(self, request: IRequest) -> bytes | None:
        """
        The API key the request carries, if it is one of ours.
        """
        return self._keyIn(request.requestHeaders)

    def _keyIn(self, headers: Any) -> bytes | None:
        return self.matchKey(credentials(headers))

    def matchKey(self, given: Sequence[bytes]) -> bytes | None:
        """
        The key among C{given} (the request's credentials) that is one of
        ours; None unless exactly one is offered and it is.
        """
        if len(given) != 1:
            return None
        # Compare with every key, in constant time for each.
        matches = [hmac.compare_digest(given[0], key) for key in self._keys]
        return self._keys[matches.index(True)] if any(matches) else None

    def _refuseHost(self, request: IRequest) -> bytes | None:
        """
        A 421 for a page request whose Host is not one of ours (a page that
        a DNS-rebinding site could read), else None.
        """
        if "*" in self._allowedHosts:
            return None
        hosts = request.requestHeaders.getRawHeaders(b"host", [b""])
        if all(hostName(host) in self._allowedHosts for host in hosts):
            return None
        shown = b", ".join(hosts).decode("utf-8", "replace")[:100]
        names = {hostName(host) for host in hosts}
        name = names.pop() if len(names) == 1 else None
        if name is None or not name.isprintable() or len(name) > 100:
            name = "NAME"
        return _error(
            request,
            421,
            f"pages are not served to Host {shown!r} (a guard against DNS"
            f" rebinding); to allow it, start chatweb with --allowed-host {name}"
            f" (make run ARGS=\"--allowed-host {name}\"; allowedHosts=[{name!r}]"
            " when embedding)",
        )

    def _shareScope(self, request: IRequest) -> str | bytes:
        """
        What the token of a key-less request must be valid for: the index,
        or the session named by C{id}; else an error body.
        """
        if request.postpath == [b"sessions"]:
            return INDEX_SCOPE
        return _sessionIdArgument(request)

    def _verifyToken(self, request: IRequest, scope: str) -> int | bytes:
        """
        The expiry of the request's one share token, valid for C{scope} (a
        session id, or L{INDEX_SCOPE}); else a 401 error body.
        """
        if self._shareLinks is None:
            return _error(
                request,
                401,
                "share links are turned off on this server; send the X-API-Key header",
            )
        tokens = request.args.get(b"token") or []
        if len(tokens) != 1:
            return _error(request, 401, "send one share token, or the X-API-Key header")
        try:
            return self._shareLinks.verify(scope, tokens[0].decode("ascii"))
        except UnicodeDecodeError:
            return _error(request, 401, "the share token is malformed")
        except InvalidToken as e:
            return _error(request, 401, str(e))

    def _refuse(self, request: IRequest, method: bytes) -> bytes | None:
        """
        A 404 for a method that is not the route's (werkzeug lets HEAD into
        GET routes), else None.
        """
        if request.method != method:
            return _error(request, 404, "not found")
        return None

    def _unavailable(self, request: IRequest, failure: Any) -> Any:
        """
        A 503 error body for a request whose read or write failed (the log
        says why); unless its client went away (Klein cancelled its
        Deferred): that is no failure of the backend's.  (A cancellation
        of the backend's own, a timeout, is one.)
        """
        cause = failure.value.subFailure if failure.check(FirstError) else failure
        if cause.check(CancelledError) and getattr(request, "_disconnected", False):
            return cause  # (what Klein expects of a request gone)
        logFailure(_log, cause, "The session backend failed")
        return _error(request, 503, "the session backend is unavailable; retry later")

    # -- routes (handlers in chatweb/web/_messages.py and chatweb/web/_pages.py)

    @cached_property
    def _messages(self) -> Messages:
        return Messages(self)

    @cached_property
    def _pages(self) -> Pages:
        return Pages(self)

    @app.route("/", methods=["POST"])
    def postMessage(self, request: IRequest) -> Any:
        return self._messages.post(request)

    @app.route("/sessions/<path:sessionPath>/messages", methods=["POST"])
    def postText(self, request: IRequest, sessionPath: str) -> Any:
        return self._messages.postText(request)

    @app.route("/queue", methods=["GET"])
    def listQueue(self, request: IRequest) -> Any:
        return self._messages.listQueue(request)

    @app.route("/queue/<int:messageId>/retry", methods=["POST"])
    def retryMessage(self, request: IRequest, messageId: int) -> Any:
        return self._messages.retry(request, messageId)

    @app.route("/queue/<int:messageId>", methods=["DELETE"])
    def discardMessage(self, request: IRequest, messageId: int) -> Any:
        return self._messages.discard(request, messageId)

    @app.route("/sessions", methods=["GET"])
    def listSessions(self, request: IRequest) -> Any:
        return self._pages.listSessions(request)

    @app.route("/session/share", methods=["POST"])
    def shareSession(self, request: IRequest) -> Any:
        return self._pages.shareSession(request)

    @app.route("/sessions/share", methods=["POST"])
    def shareIndex(self, request: IRequest) -> Any:
        return self._pages.shareIndex(request)

    @app.route("/session/raw", methods=["GET"])
    def exportRaw(self, request: IRequest) -> Any:
        return self._pages.exportRaw(request)

    @app.route("/session", methods=["GET"])
    def previewSession(self, request: IRequest) -> Any:
        return self._pages.previewSession(request)

    # -- everything else

    @app.handle_errors(NotFound, MethodNotAllowed)
    def notFound(self, request: IRequest, failure: Any) -> bytes:
        return _error(request, 404, "not found")

    @app.handle_errors(RequestRedirect)
    def redirected(self, request: IRequest, failure: Any) -> bytes:
        # werkzeug would redirect to a URL built from the Host header.
        return _notFound(request)

    @app.handle_errors(Exception)
    def internalError(self, request: IRequest, failure: Any) -> bytes:
        _log.failure("Unhandled error in a route", failure)
        return _error(request, 500, "internal error")

    # -- the session API (handlers in chatweb/web/_sessionapi.py)

    @cached_property
    def _sessionAPI(self) -> SessionAPI:
        return SessionAPI(self)

    @app.route("/sessions/<path:rest>", methods=["GET"])
    def sessionResource(self, request: IRequest, rest: str) -> Any:
        return self._sessionAPI.getSessionResource(request)

    @app.route("/messages", methods=["GET"])
    def sessionMessages(self, request: IRequest) -> Any:
        return self._sessionAPI.listMessages(request)

    @app.route("/providers", methods=["GET"])
    def providers(self, request: IRequest) -> Any:
        return self._sessionAPI.listProviders(request)

    @app.route("/session/new", methods=["POST"])
    def newSession(self, request: IRequest) -> Any:
        return self._sessionAPI.newSession(request)

    @app.route("/session/<path:rest>", methods=["POST", "PUT", "DELETE"])
    def sessionAction(self, request: IRequest, rest: str) -> Any:
        return self._sessionAPI.sessionAction(request, request.method)

    @app.route("/queue/<int:messageId>", methods=["GET"])
    def queuedMessage(self, request: IRequest, messageId: int) -> Any:
        return self._sessionAPI.messageStatus(request, messageId)

    # -- live events, health and metrics (issue 10 §3, §4): the handlers are
    # in chatweb/web/_events.py, chatweb/web/_health.py and chatweb/metrics.py;
    # ChatWebService sets these three (None: the route is a 404).

    live: Any = None
    health: Any = None
    metrics: Any = None

    @app.route("/events", methods=["GET"])
    def allEvents(self, request: IRequest) -> Any:
        return self._optional(request, self.live, lambda h: h.stream(request, None),
                              "event streams")

    @app.route("/sessions/<path:sessionPath>/events", methods=["GET"])
    def sessionEvents(self, request: IRequest, sessionPath: str) -> Any:
        # Twisted decodes %2F before routing: /sessions/x%2Fevents is the
        # session "x/events" (the session API's), not a stream.
        if not request.uri.split(b"?", 1)[0].endswith(b"/events"):
            return self._sessionAPI.getSessionResource(request)
        return self._optional(request, self.live, lambda h: h.sessionStream(request),
                              "event streams")

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> Any:
        return self._optional(request, self.health, lambda h: h.render(request),
                              "a health check")

    @app.route("/metrics", methods=["GET"])
    def metricsPage(self, request: IRequest) -> Any:
        return self._optional(request, self.metrics, lambda h: h.render(request),
                              "metrics")

    def _optional(self, request: IRequest, handler: Any, call: Any, what: str) -> Any:
        if handler is None:
            # A ChatWebAPI of its own (chatWebInMemory's, an embedder's).
            return _error(
                request,
                404,
                f"not found (this API serves no {what}: a ChatWebService does;"
                " in tests, chatweb.testing.startChatWeb)",
            )
        return call(handler)
