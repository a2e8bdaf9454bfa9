"""
The HTTP API: chat.nvim's routes over Klein.

Every request must carry a valid X-API-Key, except one: C{GET /session}
with a share link's token.  Errors are JSON objects C{{"error": "..."}} that
say what was wrong.  Only the routes below exist: any other method or path
is a 404.

HTML pages (C{GET /session}, and C{GET /sessions} asking for C{text/html})
are only served to a Host that is allowed (DNS rebinding).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from urllib.parse import quote
from typing import Any, Sequence, cast
from weakref import WeakKeyDictionary

from klein import Klein
from klein.interfaces import IKleinRequest
from twisted.internet.defer import DeferredSemaphore, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import IntegerConverter, RequestRedirect

from chatweb.errors import IdempotencyConflict, QueueFull, UnknownMessage, WrongState
from chatweb.web._hosts import LOOPBACK_HOSTS, hostName, normalizeAllowedHost
from chatweb.importer import exportSession
from chatweb.interfaces import ISessionAdapter
from chatweb.limits import Limits, RateLimiter, retryAfter
from chatweb.model._values import FAILED, PENDING, QueuedMessage, Session
from chatweb.render._preview import (
    SECURITY_HEADERS,
    inBackground,
    messageSize,
    pause,
    pageBounds,
    renderIndex,
    renderSession,
    renderSessionInline,
)
from chatweb.queue._queue import MessageQueue
from chatweb.web._share import InvalidToken, ShareLinks
from chatweb.web._throttle import FailureThrottle, clientKey
from chatweb.web._errors import _REASONS, _error, _notFound, _throttledMessage
from chatweb.web._guard import _Guard, checkAPIKeys
from chatweb.web._json import _exportJSON, _json
from chatweb.web._validation import (
    BadRequest,
    parseMessage,
    parseShareRequest,
    validateSessionId,
)

#: Seconds the share links on the HTML index of sessions stay valid.
INDEX_LINK_LIFETIME = 15 * 60
#: What an index share link is signed for: no session id can be this (ids
#: have no control characters), so an index token opens no session page.
INDEX_SCOPE = "\0index"

_log = Logger()


class _AsciiInteger(IntegerConverter):
    """
    werkzeug's C{int} converter, for ASCII digits only (C{\\d} and C{int()}
    take any Unicode digit: C{/queue/١} would be message 1).
    """

    regex = r"[0-9]+"


class _Refused(Exception):
    """
    A request refused before its route's work; C{body} is the answer.
    """

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body


def _acceptsHTML(request: IRequest) -> bool:
    """
    Whether the Accept header names C{text/html} (with a quality above 0).
    """
    for value in request.requestHeaders.getRawHeaders(b"accept", []):
        for item in value.split(b","):
            mediaType, *parameters = item.split(b";")
            if mediaType.strip().lower() != b"text/html":
                continue
            quality = 1.0
            for parameter in parameters:
                name, _, number = parameter.partition(b"=")
                if name.strip().lower() == b"q":
                    try:
                        quality = float(number.strip())
                    except ValueError:
                        quality = 0.0
            if quality > 0:
                return True
    return False


MAX_IDEMPOTENCY_KEY = 255
#: Pages of sessions longer than this render on a thread, not the reactor.
RENDER_INLINE_LIMIT = 20
#: ... and so do pages with more text than this, in characters.  Smaller
#: pages render on the reactor's thread unless they take more than 5 ms of
#: CPU there (L{renderSessionInline}).
RENDER_INLINE_CHARACTERS = 2_000
#: Renders and exports that run on threads at once (CPU is the limit) ...
RENDER_THREADS = 2
#: ... and that may wait for one; past this, a 503.
RENDER_WAITING = 16
#: Sessions of more messages than this, or more characters, are turned
#: into JSON (GET /session/raw) on a thread.
EXPORT_INLINE_LIMIT = 200
EXPORT_INLINE_CHARACTERS = 200_000
#: An HTML index of more sessions than this (a share token each) renders on
#: a thread.
INDEX_INLINE_LIMIT = 200
#: Message ids are SQLite integers.
MAX_MESSAGE_ID = 2**63 - 1


def _idempotencyKey(request: IRequest) -> str | None:
    values = request.requestHeaders.getRawHeaders(b"idempotency-key")
    if not values:
        return None
    if len(values) != 1:
        raise BadRequest("send at most one Idempotency-Key header")
    value = values[0]
    if not 0 < len(value) <= MAX_IDEMPOTENCY_KEY or not all(
        0x21 <= b <= 0x7E for b in value
    ):
        raise BadRequest(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII"
            " characters without spaces"
        )
    return value.decode("ascii")


def _heavy(
    session: Session, undelivered: Sequence[QueuedMessage], start: int, end: int
) -> bool:
    """
    Whether rendering the page that shows messages C{start} to C{end} of
    C{session} could take long enough to belong off the reactor thread.
    """
    if len(session.messages) + len(undelivered) > RENDER_INLINE_LIMIT:
        return True
    characters = sum(messageSize(m) for m in session.messages[start:end]) + sum(
        len(m.content) for m in undelivered
    )
    return characters > RENDER_INLINE_CHARACTERS


def _before(request: IRequest) -> int | None | bytes:
    """
    The query parameter C{before} (the page that ends before that message
    index), None without one, or a 400 error body.
    """
    values = request.args.get(b"before")
    if values is None:
        return None
    if len(values) != 1 or not re.fullmatch(rb"[1-9][0-9]{0,17}", values[0]):
        return _error(
            request,
            400,
            "query parameter 'before' must be one positive whole number (a"
            " message index)",
        )
    return int(values[0])


def _sessionPath(prefix: str, sessionId: str, token: str | None) -> str:
    """
    The path of C{sessionId}'s page, for the API mounted at C{prefix}, with
    a share token if one is given.
    """
    url = f"{prefix}/session?id={quote(sessionId, safe='')}"
    return url if token is None else f"{url}&token={token}"


def _mountPrefix(request: IRequest) -> str:
    """
    The path the API is mounted at ("" at the root), for links to itself.
    """
    # Klein keeps it as the mapper's script name ("" or "/" at the root).
    scriptName = IKleinRequest(request).mapper.script_name
    return quote(scriptName.rstrip("/"), safe="/")


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

    def refuseBeforeBody(self, request: IRequest) -> tuple[int, bytes, str] | None:
        """
        For L{chatweb.web._site.ChatWebSite}: C{(code, reason, message)} to
        refuse a request whose body is not read yet (its client is
        throttled, or it carries no valid key), else None.
        """
        client = clientKey(request.getClientAddress())
        wait = self._authFailures.wait(client)
        if wait:
            return 429, _REASONS[429], _throttledMessage(wait)
        if self._authorized(request) is not None:
            return None
        if request.requestHeaders.hasHeader(b"x-api-key"):
            self._authFailures.failed(client)
        return 401, b"Unauthorized", "missing or invalid X-API-Key header"

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
        given = headers.getRawHeaders(b"x-api-key")
        if not given or len(given) != 1:
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
        return self._sessionIdArgument(request)

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

    def _sessionURL(self, request: IRequest, sessionId: str, token: str | None) -> str:
        """
        The path of C{sessionId}'s page (below where the API is mounted),
        with a share token if one is given.
        """
        return _sessionPath(_mountPrefix(request), sessionId, token)

    def _findSession(self, sessionId: str) -> Any:
        """
        A Deferred: the session from the adapter (an empty one if it only has
        messages in the journal), or None if there is no such session; and
        its undelivered messages.
        """

        def found(results: list[Any]) -> tuple[Session | None, list[QueuedMessage]]:
            session, undelivered = results
            if session is None and undelivered:
                session = Session(id=sessionId)
            return session, undelivered

        return gatherResults(
            [self._adapter.getSession(sessionId), self._queue.journal.messages(sessionId)],
            consumeErrors=True,
        ).addCallback(found)

    def _sessionExists(self, sessionId: str) -> Any:
        """
        A Deferred: the session, as L{_findSession} finds it, or None.
        """
        return self._findSession(sessionId).addCallback(lambda found: found[0])

    def _refuse(self, request: IRequest, method: bytes) -> bytes | None:
        """
        A 404 for a method that is not the route's (werkzeug lets HEAD into
        GET routes), else None.
        """
        if request.method != method:
            return _error(request, 404, "not found")
        return None

    def _refuseMessage(
        self, request: IRequest, method: bytes, messageId: int
    ) -> bytes | None:
        """
        L{_refuse}, and a 404 for an id no message can have.
        """
        refused = self._refuse(request, method)
        if refused is None and messageId > MAX_MESSAGE_ID:
            refused = _error(request, 404, f"no queued message {messageId}")
        return refused

    # -- routes

    @app.route("/", methods=["POST"])
    def postMessage(self, request: IRequest) -> Any:
        refused = self._refuse(request, b"POST")
        if refused is not None:
            return refused
        try:
            body = self._readBody(request)
        except _Refused as refusal:
            return refusal.body
        try:
            idempotencyKey = _idempotencyKey(request)
            session, content = parseMessage(body)
        except BadRequest as e:
            return _error(request, 400, str(e))
        if len(content) > self._limits.maxContentLength:
            return _error(
                request,
                413,
                f"field 'content' is longer than {self._limits.maxContentLength}"
                " characters",
            )

        def queued(_: object) -> bytes:
            request.setResponseCode(204)
            return b""

        def failed(failure: Any) -> bytes:
            if failure.check(QueueFull):
                full = failure.value
                request.setHeader(b"Retry-After", retryAfter(full.retryAfter))
                if full.scope == "session":
                    return _error(
                        request,
                        429,
                        f"session {session!r} already has {full.limit} messages"
                        " waiting; retry later",
                    )
                return _error(
                    request, 503, f"{full.limit} messages are waiting; retry later"
                )
            if failure.check(IdempotencyConflict):
                return _error(
                    request,
                    422,
                    "this Idempotency-Key was already used for another session"
                    " or other content",
                )
            _log.failure("Could not store a message", failure)
            return _error(request, 503, "the message could not be stored; retry later")

        if idempotencyKey is not None:
            # Each API key has its own idempotency keys.
            apiKey = self._authorized(request) or b""
            idempotencyKey = hashlib.sha256(apiKey).hexdigest()[:16] + ":" + idempotencyKey
        return self._queue.post(session, content, idempotencyKey).addCallbacks(
            queued, failed
        )

    @app.route("/queue", methods=["GET"])
    def listQueue(self, request: IRequest) -> Any:
        refused = self._refuse(request, b"GET")
        if refused is not None:
            return refused
        values = request.args.get(b"session") or [b""]
        try:
            session = validateSessionId(values[0].decode("utf-8"), "session")
        except UnicodeDecodeError:
            return _error(request, 400, "query parameter 'session' is not valid UTF-8")
        except BadRequest as e:
            return _error(request, 400, str(e).replace("field", "query parameter"))

        def listed(messages: list[QueuedMessage]) -> bytes:
            delivering = self._queue.deliveringNow(session)
            return _json(
                request,
                {
                    "session": session,
                    "pending": [
                        dict(m.asDict(), delivering=m.id == delivering)
                        for m in messages
                        if m.state == PENDING
                    ],
                    "failed": [m.asDict() for m in messages if m.state == FAILED],
                },
            )

        return self._queue.journal.messages(session).addCallbacks(
            listed, lambda f: self._unavailable(request, f)
        )

    @app.route("/queue/<int:messageId>/retry", methods=["POST"])
    def retryMessage(self, request: IRequest, messageId: int) -> Any:
        refused = self._refuseMessage(request, b"POST", messageId)
        if refused is not None:
            return refused
        return self._queue.retry(messageId).addCallbacks(
            lambda message: _json(request, message.asDict()),
            lambda f: self._queueError(request, f, messageId, "retried (only failed ones can be)"),
        )

    @app.route("/queue/<int:messageId>", methods=["DELETE"])
    def discardMessage(self, request: IRequest, messageId: int) -> Any:
        refused = self._refuseMessage(request, b"DELETE", messageId)
        if refused is not None:
            return refused

        def discarded(_: object) -> bytes:
            request.setResponseCode(204)
            return b""

        return self._queue.discard(messageId).addCallbacks(
            discarded,
            lambda f: self._queueError(request, f, messageId, "discarded"),
        )

    def _queueError(self, request: IRequest, failure: Any, messageId: int, what: str) -> bytes:
        if failure.check(UnknownMessage):
            return _error(request, 404, f"no queued message {messageId}")
        if failure.check(WrongState):
            return _error(
                request,
                409,
                f"message {messageId} is {failure.value.state} and cannot be {what}",
            )
        return self._unavailable(request, failure)

    @app.route("/sessions", methods=["GET"])
    def listSessions(self, request: IRequest) -> Any:
        refused = self._refuse(request, b"GET")
        if refused is not None:
            return refused

        # Without a key, the Guard let the request in for its index token.
        tokenExpiry = self._shareExpiry.get(request)
        html = tokenExpiry is not None or _acceptsHTML(request)
        request.setHeader(b"Vary", b"Accept")
        linkLifetime = INDEX_LINK_LIFETIME
        if html:
            refused = self._refuseHost(request)
            if refused is not None:
                return refused
        if tokenExpiry is not None:
            remaining = tokenExpiry - int(self._clock.seconds())
            linkLifetime = max(1, min(linkLifetime, remaining))

        def listed(results: list[Any]) -> bytes:
            ids, failed = results
            sessionIds = sorted(set(ids) | set(failed) | self._queue.sessionsWithPending())
            if not html:
                return _json(request, sessionIds)
            prefix = _mountPrefix(request)
            if len(sessionIds) <= INDEX_INLINE_LIMIT:
                return self._html(request, self._index(prefix, sessionIds, linkLifetime))
            # A share token per session (and the page) cost too much time
            # for the reactor thread with many sessions.
            return self._inThread(
                request, self._index, prefix, sessionIds, linkLifetime
            ).addCallback(lambda page: self._html(request, page))

        return gatherResults(
            [self._adapter.listSessions(), self._queue.journal.failedSessions()],
            consumeErrors=True,
        ).addCallbacks(listed, lambda f: self._unavailable(request, f))

    def _index(self, prefix: str, sessionIds: list[str], lifetime: int) -> str:
        """
        The HTML index of C{sessionIds}, for the API mounted at C{prefix}.
        Its links are share links that live C{lifetime} seconds (at most
        L{INDEX_LINK_LIFETIME}, never past the index's own link), so that a
        browser can follow them without the key; plain links when share
        links are off.  Safe to call on a thread.
        """
        links = {}
        for n, sessionId in enumerate(sessionIds):
            if not n & 63:
                pause()
            token = None
            if self._shareLinks is not None:
                token, _ = self._shareLinks.issue(sessionId, lifetime)
            links[sessionId] = _sessionPath(prefix, sessionId, token)
        return renderIndex(sessionIds, links)

    def _inThread(self, request: IRequest, work: Any, *args: Any) -> Any:
        """
        A Deferred: C{work(*args)} on a thread, L{RENDER_THREADS} at a time;
        a 503 error body at once when L{RENDER_WAITING} already wait.
        """
        if len(self._renders.waiting) >= RENDER_WAITING:
            request.setHeader(b"Retry-After", b"1")
            return succeed(
                _error(request, 503, "too many pages are being prepared; retry shortly")
            )
        return self._renders.run(deferToThread, inBackground, work, *args)

    def _readShareRequest(
        self, request: IRequest, sessionRequired: bool
    ) -> tuple[str, int] | bytes:
        """
        The session and lifetime a share-link request asks for, or the
        error body that refuses it.
        """
        refused = self._refuse(request, b"POST")
        if refused is not None:
            return refused
        if self._shareLinks is None:
            return _error(
                request,
                403,
                "share links are turned off on this server (it was started"
                " without a share secret)",
            )
        try:
            body = self._readBody(request)
        except _Refused as refusal:
            return refusal.body
        try:
            return parseShareRequest(
                body if body.strip() or sessionRequired else b"{}", sessionRequired
            )
        except BadRequest as e:
            return _error(request, 400, str(e))

    def _readBody(self, request: IRequest) -> bytes:
        """
        The request body.  ChatWebSite refuses large bodies before they are
        read; this covers a Site of the embedding program's own.

        @raise _Refused: with the 413 answer, if it is too large.
        """
        limit = self._limits.maxBodySize
        body = request.content.read(limit + 1)
        if len(body) > limit:
            raise _Refused(
                _error(request, 413, f"request body is larger than the limit of {limit} bytes")
            )
        return body

    @app.route("/session/share", methods=["POST"])
    def shareSession(self, request: IRequest) -> Any:
        asked = self._readShareRequest(request, sessionRequired=True)
        if isinstance(asked, bytes):
            return asked
        sessionId, lifetime = asked
        shareLinks = self._shareLinks
        assert shareLinks is not None

        def share(session: Session | None) -> bytes:
            if session is None:
                return _error(request, 404, f"no session {sessionId!r}")
            token, expires = shareLinks.issue(sessionId, lifetime)
            return _json(
                request,
                {"url": self._sessionURL(request, sessionId, token), "expires": expires},
            )

        return self._sessionExists(sessionId).addCallbacks(
            share, lambda f: self._unavailable(request, f)
        )

    @app.route("/sessions/share", methods=["POST"])
    def shareIndex(self, request: IRequest) -> Any:
        """
        A share link to the HTML index of all sessions, for a browser.
        """
        asked = self._readShareRequest(request, sessionRequired=False)
        if isinstance(asked, bytes):
            return asked
        _, lifetime = asked
        assert self._shareLinks is not None
        token, expires = self._shareLinks.issue(INDEX_SCOPE, lifetime)
        url = f"{_mountPrefix(request)}/sessions?token={token}"
        return _json(request, {"url": url, "expires": expires})

    @app.route("/session/raw", methods=["GET"])
    def exportRaw(self, request: IRequest) -> Any:
        refused = self._refuse(request, b"GET")
        if refused is not None:
            return refused
        sessionId = self._sessionIdArgument(request)
        if not isinstance(sessionId, str):
            return sessionId

        def export(session: Session | None) -> Any:
            if session is None:
                return _error(request, 404, f"no session {sessionId!r}")
            if len(session.messages) <= EXPORT_INLINE_LIMIT and (
                sum(messageSize(m) for m in session.messages) <= EXPORT_INLINE_CHARACTERS
            ):
                return _json(request, exportSession(session))
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Cache-Control", b"no-store")
            return self._inThread(request, _exportJSON, session)

        return self._sessionExists(sessionId).addCallbacks(
            export, lambda f: self._unavailable(request, f)
        )

    def _sessionIdArgument(self, request: IRequest) -> str | bytes:
        """
        The query parameter C{id}, or a 400 error body.
        """
        values = request.args.get(b"id") or [b""]
        try:
            sessionId = values[0].decode("utf-8")
        except UnicodeDecodeError:
            return _error(request, 400, "query parameter 'id' is not valid UTF-8")
        if not sessionId:
            return _error(request, 400, "missing query parameter 'id'")
        return sessionId

    @app.route("/session", methods=["GET"])
    def previewSession(self, request: IRequest) -> Any:
        refused = self._refuse(request, b"GET")
        if refused is None:
            refused = self._refuseHost(request)
        if refused is not None:
            return refused
        # Without a key, the Guard has checked the share token for this id.
        sessionId = self._sessionIdArgument(request)
        if not isinstance(sessionId, str):
            return sessionId

        before = _before(request)
        if isinstance(before, bytes):
            return before
        # Links to the other pages keep the share token that opened this one.
        token = None
        if self._shareExpiry.get(request) is not None:
            token = request.args[b"token"][0].decode("ascii")
        base = self._sessionURL(request, sessionId, token)

        def pageURL(before: int | None) -> str:
            return base if before is None else f"{base}&before={before}"

        def render(found: tuple[Session | None, list[QueuedMessage]]) -> Any:
            session, undelivered = found
            if session is None:
                return _error(request, 404, f"no session {sessionId!r}")
            start, end = pageBounds(session.messages, before)
            if not _heavy(session, undelivered, start, end):
                page = renderSessionInline(session, undelivered, before, pageURL)
                if page is not None:
                    return self._html(request, page)
            # Other pages render off the reactor thread, a few at a time.
            page = self._inThread(request, renderSession, session, undelivered, before, pageURL)
            return page.addCallback(lambda html: self._html(request, html))

        return self._findSession(sessionId).addCallbacks(
            render, lambda f: self._unavailable(request, f)
        )

    def _html(self, request: IRequest, html: str | bytes) -> bytes:
        if isinstance(html, bytes):  # an error body from _inThread
            return html
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        return html.encode("utf-8")

    def _unavailable(self, request: IRequest, failure: Any) -> bytes:
        _log.failure("The session backend failed", failure)
        return _error(request, 503, "the session backend is unavailable; retry later")

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

    # -- live events, health and metrics (issue 10 §3, §4): the handlers are
    # in chatweb/web/_events.py, chatweb/web/_health.py and chatweb/metrics.py;
    # ChatWebService sets these three (None: the route is a 404).

    live: Any = None
    health: Any = None
    metrics: Any = None

    @app.route("/events", methods=["GET"])
    def allEvents(self, request: IRequest) -> Any:
        return self._optional(request, self.live, lambda h: h.stream(request, None))

    @app.route("/sessions/<path:sessionPath>/events", methods=["GET"])
    def sessionEvents(self, request: IRequest, sessionPath: str) -> Any:
        return self._optional(request, self.live, lambda h: h.sessionStream(request))

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> Any:
        return self._optional(request, self.health, lambda h: h.render(request))

    @app.route("/metrics", methods=["GET"])
    def metricsPage(self, request: IRequest) -> Any:
        return self._optional(request, self.metrics, lambda h: h.render(request))

    def _optional(self, request: IRequest, handler: Any, call: Any) -> Any:
        return _notFound(request) if handler is None else call(handler)
