"""
The pages and the share links: C{GET /session} (a session's page, a page
of messages at a time), C{GET /session/raw} (the export), C{GET /sessions}
(the list, or its HTML index), C{POST /session/share} and
C{POST /sessions/share}.  Rendering (pure, in L{chatweb.render}) runs on
the reactor's thread pool when it would take long; with page workers
(L{chatweb.web._workers}), pages, lists and exports are read and rendered
in other processes.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Callable, Sequence
from urllib.parse import quote

from klein.interfaces import IKleinRequest
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    gatherResults,
    succeed,
)
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from chatweb.importer import exportSession
from chatweb.model import QueuedMessage, Session, SessionPage
from chatweb.render._preview import (
    PAGE_MESSAGES,
    SECURITY_HEADERS,
    _Window,
    inBackground,
    messageSize,
    pageBounds,
    pause,
    renderIndex,
    renderSession,
    renderSessionInline,
)
from chatweb.web._errors import _error
from chatweb.web._json import _encodedJSON, _exportJSON, _json
from chatweb.web._messages import _readBody, _Refused
from chatweb.web._validation import BadRequest, parseShareRequest

from chatweb.sessions import undelivered

if TYPE_CHECKING:
    from chatweb.sessions import SessionView
    from chatweb.web._api import ChatWebAPI
    from chatweb.web._share import ShareLinks

#: Seconds the share links on the HTML index of sessions stay valid.
INDEX_LINK_LIFETIME = 15 * 60
#: What an index share link is signed for: no session id can be this (ids
#: have no control characters), so an index token opens no session page.
INDEX_SCOPE = "\0index"
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


def renderSessionInThread(
    session: Session,
    queued: Sequence[QueuedMessage] = (),
    before: int | None = None,
    pageURL: Callable[[int | None], str] | None = None,
) -> Deferred[str]:
    """
    L{renderSession} on the reactor's thread pool.  Rendering is pure CPU
    work that grows with the session (about a third of a millisecond per
    message: see bench/render.py), too long for the reactor thread once a
    session has thousands of messages.
    """
    return deferToThread(
        inBackground, renderSession, session, tuple(queued), before, pageURL
    )


def mergeSessionIds(ids: Sequence[str], others: set[str]) -> list[str]:
    """
    The sorted union of the adapter's session ids and a few others (the
    sessions with failed or pending messages), each once.

    Sorting a set of 10,000 ids took 5 ms on the reactor's thread; the
    local backend lists its ids in order already, which C{sorted} sees in
    one pass, and the few others are found by bisection.
    """
    ordered = sorted(ids)
    unique = all(a < b for a, b in zip(ordered, ordered[1:]))
    if not unique:
        ordered = sorted(set(ordered))
    missing = []
    for sessionId in others:
        at = bisect_left(ordered, sessionId)
        if at == len(ordered) or ordered[at] != sessionId:
            missing.append(sessionId)
    if missing:
        ordered = sorted(ordered + missing)
    return ordered


def indexLinks(
    sessionIds: list[str], prefix: str, lifetime: int, shareLinks: ShareLinks | None
) -> dict[str, str]:
    """
    The link of each of C{sessionIds} on the HTML index, for the API
    mounted at C{prefix}: share links that live C{lifetime} seconds (at
    most L{INDEX_LINK_LIFETIME}, never past the index's own link), so that
    a browser can follow them without the key; plain links when share
    links are off.
    """
    links = {}
    for n, sessionId in enumerate(sessionIds):
        if not n & 63:
            pause()
        token = None
        if shareLinks is not None:
            token, _ = shareLinks.issue(sessionId, lifetime)
        links[sessionId] = _sessionPath(prefix, sessionId, token)
    return links


def pageLinks(base: str) -> Callable[[int | None], str]:
    """
    The URLs of a session's pages, from C{base}, the URL of its newest.
    """

    def pageURL(before: int | None) -> str:
        return base if before is None else f"{base}&before={before}"

    return pageURL


def _cancelled(failure: Failure) -> None:
    failure.trap(CancelledError)


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


def _heavy(
    page: SessionPage, undelivered: Sequence[QueuedMessage], start: int, end: int
) -> bool:
    """
    Whether rendering the page that shows messages C{start} to C{end} of
    the session could take long enough to belong off the reactor thread.
    """
    if page.total + len(undelivered) > RENDER_INLINE_LIMIT:
        return True
    characters = sum(messageSize(m) for m in _Window(page)[start:end]) + sum(
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


def _sessionURL(request: IRequest, sessionId: str, token: str | None) -> str:
    """
    The path of C{sessionId}'s page (below where the API is mounted),
    with a share token if one is given.
    """
    return _sessionPath(_mountPrefix(request), sessionId, token)


def _sessionIdArgument(request: IRequest) -> str | bytes:
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


def _html(request: IRequest, html: str | bytes) -> bytes:
    if isinstance(html, bytes):  # an error body from inThread
        return html
    return _htmlPage(request, html)


def _htmlPage(request: IRequest, page: str | bytes) -> bytes:
    """
    C{page} (HTML, encoded already if bytes: a page worker's) as the answer.
    """
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)
    return page if isinstance(page, bytes) else page.encode("utf-8")


class Pages:
    """
    The handlers of the page, export, list and share routes of a
    L{ChatWebAPI}.
    """

    def __init__(self, api: ChatWebAPI) -> None:
        self._api = api

    def inThread(self, request: IRequest, work: Any, *args: Any) -> Any:
        """
        A Deferred: C{work(*args)} on a thread, L{RENDER_THREADS} at a time
        (one whose client went away holds its place until it is done: see
        L{_holdingARender}); a 503 error body at once when L{RENDER_WAITING}
        already wait.
        """
        busy = self._tooBusy(request)
        if busy is not None:
            return busy
        return self._holdingARender(lambda: deferToThread(inBackground, work, *args))

    def inWorker(
        self, request: IRequest, kind: str, *args: Any, then: Callable[[Any], bytes]
    ) -> Any:
        """
        A Deferred: C{then} of what the API's page workers answer to
        C{kind} (a L{chatweb.web._pageworker.PageWorker} method) and
        C{args} (L{askWorker}); a 404 if they answer None (no session
        C{args[0]}), a 503 if they fail, and the same 503 as L{inThread}
        when too many wait.
        """
        busy = self._tooBusy(request)
        if busy is not None:
            return busy

        def answered(answer: Any) -> bytes:
            if answer is None:
                return _error(request, 404, f"no session {args[0]!r}")
            return then(answer)

        return self.askWorker(kind, *args).addCallbacks(
            answered, lambda f: self._api._unavailable(request, f)
        )

    def askWorker(self, kind: str, *args: Any) -> Deferred[Any]:
        """
        What the API's page workers answer to C{kind} and C{args}, a request
        at a time per worker (see L{_holdingARender}).
        """
        workers = self._api.pageWorkers
        assert workers is not None
        return self._holdingARender(lambda: workers.run(kind, *args))

    def _holdingARender(self, start: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        """
        What C{start()} gives, started once one of the API's render places
        is free, which it holds until that is done.  A request whose client
        goes away keeps its place until then (the thread or the worker
        prepares it anyway), so more never pile up than the limit.
        """
        renders = self._api._renders
        acquiring = renders.acquire()
        result: Deferred[Any] = Deferred(lambda _: acquiring.cancel())

        def answered(outcome: object) -> None:
            renders.release()
            if result.called:
                return  # its client went away
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        def acquired(_: object) -> None:
            try:
                started = start()
            except Exception:
                answered(Failure())
            else:
                started.addBoth(answered)

        acquiring.addCallbacks(acquired, _cancelled)
        return result

    def workerFree(self) -> bool:
        """
        Whether the page workers are on and one would take a request now.
        Light reads (a list of ids, a session's detail or messages) go to
        one only then: they must not wait behind long pages and exports
        (chat.nvim polls them), so otherwise this process reads them, as
        it does without workers.
        """
        return self._api.pageWorkers is not None and self._api._renders.tokens > 0

    def _tooBusy(self, request: IRequest) -> Deferred[bytes] | None:
        """
        A 503 error body if L{RENDER_WAITING} pages already wait, else None.
        """
        if len(self._api._renders.waiting) >= RENDER_WAITING:
            request.setHeader(b"Retry-After", b"1")
            return succeed(
                _error(request, 503, "too many pages are being prepared; retry shortly")
            )
        return None

    def _sessionExists(self, sessionId: str) -> Any:
        """
        A Deferred: the session from the read model (chatweb/sessions.py;
        an empty one if it only has messages in the journal), or None if
        there is no such session.
        """
        return self._api._sessionAPI.sessions.get(sessionId).addCallback(
            lambda view: None if view is None else view.session
        )

    def listSessions(self, request: IRequest) -> Any:
        api = self._api
        refused = api._refuse(request, b"GET")
        if refused is not None:
            return refused
        if request.args.get(b"detail") in ([b"1"], [b"true"]) and api._shareExpiry.get(request) is None:
            return api._sessionAPI.listDetailed(request)

        # Without a key, the Guard let the request in for its index token.
        tokenExpiry = api._shareExpiry.get(request)
        html = tokenExpiry is not None or _acceptsHTML(request)
        request.setHeader(b"Vary", b"Accept")
        linkLifetime = INDEX_LINK_LIFETIME
        if html:
            refused = api._refuseHost(request)
            if refused is not None:
                return refused
        if tokenExpiry is not None:
            remaining = tokenExpiry - int(api._clock.seconds())
            linkLifetime = max(1, min(linkLifetime, remaining))

        # Taken before the adapter is asked: a session whose first message
        # is delivered meanwhile is then in one or the other.
        pending = set(api._queue.sessionsWithPending())
        if api.pageWorkers is not None and (html or self.workerFree()):
            # Read (and the index rendered) in another process.
            if html:
                return self.inWorker(
                    request, "index", sorted(pending), _mountPrefix(request),
                    linkLifetime, api._clock.seconds(),
                    then=lambda page: _htmlPage(request, page),
                )
            return self.inWorker(
                request, "ids", sorted(pending), then=lambda body: _encodedJSON(request, body)
            )

        def listed(results: list[Any]) -> bytes:
            ids, failed = results
            sessionIds = mergeSessionIds(ids, set(failed) | pending)
            if not html:
                return _json(request, sessionIds)
            prefix = _mountPrefix(request)
            if len(sessionIds) <= INDEX_INLINE_LIMIT:
                return _html(request, self._index(prefix, sessionIds, linkLifetime))
            # A share token per session (and the page) cost too much time
            # for the reactor thread with many sessions.
            return self.inThread(
                request, self._index, prefix, sessionIds, linkLifetime
            ).addCallback(lambda page: _html(request, page))

        return gatherResults(
            [api._adapter.listSessions(), api._queue.journal.failedSessions()],
            consumeErrors=True,
        ).addCallbacks(listed, lambda f: api._unavailable(request, f))

    def _index(self, prefix: str, sessionIds: list[str], lifetime: int) -> str:
        """
        The HTML index of C{sessionIds}, for the API mounted at C{prefix}
        (see L{indexLinks}).  Safe to call on a thread.
        """
        return renderIndex(
            sessionIds, indexLinks(sessionIds, prefix, lifetime, self._api._shareLinks)
        )

    def _readShareRequest(
        self, request: IRequest, sessionRequired: bool
    ) -> tuple[str, int] | bytes:
        """
        The session and lifetime a share-link request asks for, or the
        error body that refuses it.
        """
        refused = self._api._refuse(request, b"POST")
        if refused is not None:
            return refused
        if self._api._shareLinks is None:
            return _error(
                request,
                403,
                "share links are turned off on this server (it was started"
                " without a share secret)",
            )
        try:
            body = _readBody(request, self._api._limits.maxBodySize)
        except _Refused as refusal:
            return refusal.body
        try:
            return parseShareRequest(
                body if body.strip() or sessionRequired else b"{}", sessionRequired
            )
        except BadRequest as e:
            return _error(request, 400, str(e))

    def shareSession(self, request: IRequest) -> Any:
        asked = self._readShareRequest(request, sessionRequired=True)
        if isinstance(asked, bytes):
            return asked
        sessionId, lifetime = asked
        shareLinks = self._api._shareLinks
        assert shareLinks is not None

        def share(session: Session | None) -> bytes:
            if session is None:
                return _error(request, 404, f"no session {sessionId!r}")
            token, expires = shareLinks.issue(sessionId, lifetime)
            return _json(
                request,
                {"url": _sessionURL(request, sessionId, token), "expires": expires},
            )

        return self._sessionExists(sessionId).addCallbacks(
            share, lambda f: self._api._unavailable(request, f)
        )

    def shareIndex(self, request: IRequest) -> Any:
        """
        A share link to the HTML index of all sessions, for a browser.
        """
        asked = self._readShareRequest(request, sessionRequired=False)
        if isinstance(asked, bytes):
            return asked
        _, lifetime = asked
        shareLinks = self._api._shareLinks
        assert shareLinks is not None
        token, expires = shareLinks.issue(INDEX_SCOPE, lifetime)
        url = f"{_mountPrefix(request)}/sessions?token={token}"
        return _json(request, {"url": url, "expires": expires})

    def exportRaw(self, request: IRequest) -> Any:
        refused = self._api._refuse(request, b"GET")
        if refused is not None:
            return refused
        sessionId = _sessionIdArgument(request)
        if not isinstance(sessionId, str):
            return sessionId

        if self._api.pageWorkers is not None:
            # Read and turned into JSON in another process.
            return self.inWorker(
                request, "export", sessionId, then=lambda body: _encodedJSON(request, body)
            )

        def export(session: Session | None) -> Any:
            if session is None:
                return _error(request, 404, f"no session {sessionId!r}")
            if len(session.messages) <= EXPORT_INLINE_LIMIT and (
                sum(messageSize(m) for m in session.messages) <= EXPORT_INLINE_CHARACTERS
            ):
                return _json(request, exportSession(session))
            return self.inThread(request, _exportJSON, session).addCallback(
                lambda body: _encodedJSON(request, body)
            )

        return self._sessionExists(sessionId).addCallbacks(
            export, lambda f: self._api._unavailable(request, f)
        )

    def previewSession(self, request: IRequest) -> Any:
        api = self._api
        refused = api._refuse(request, b"GET")
        if refused is None:
            refused = api._refuseHost(request)
        if refused is not None:
            return refused
        # Without a key, the Guard has checked the share token for this id.
        sessionId = _sessionIdArgument(request)
        if not isinstance(sessionId, str):
            return sessionId

        before = _before(request)
        if isinstance(before, bytes):
            return before
        # Links to the other pages keep the share token that opened this one.
        token = None
        if api._shareExpiry.get(request) is not None:
            token = request.args[b"token"][0].decode("ascii")
        base = _sessionURL(request, sessionId, token)
        if api.pageWorkers is not None:
            # Read and rendered in another process (chatweb/web/_workers.py).
            return self.inWorker(
                request, "page", sessionId, before, base,
                then=lambda page: _htmlPage(request, page),
            )
        pageURL = pageLinks(base)

        def render(found: tuple[SessionPage, SessionView] | None) -> Any:
            if found is None:
                return _error(request, 404, f"no session {sessionId!r}")
            part, view = found
            waiting = undelivered(view)
            start, end = pageBounds(_Window(part), before)
            if not _heavy(part, waiting, start, end):
                html = renderSessionInline(part, waiting, before, pageURL)
                if html is not None:
                    return _html(request, html)
            # Other pages render off the reactor thread, a few at a time.
            page = self.inThread(request, renderSession, part, waiting, before, pageURL)
            return page.addCallback(lambda html: _html(request, html))

        # Only the page's messages, and those of the next page (its link),
        # are read.
        sessions = api._sessionAPI.sessions
        return sessions.page(sessionId, before, PAGE_MESSAGES).addCallbacks(
            render, lambda f: api._unavailable(request, f)
        )
