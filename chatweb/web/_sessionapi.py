"""
chat.nvim's session API: reading sessions (C{GET /sessions/{id}},
C{/sessions/{id}/raw}, C{GET /sessions?detail=1}, C{GET /messages},
C{GET /providers}) and managing them (C{POST /session/new},
C{DELETE /session/{id}}, C{/stop}, C{/clear}, C{/retry},
C{DELETE /session/{id}/messages/{index}}, C{PUT /session/{id}/FIELD}).

Session ids are written percent-encoded in paths (C{/sessions/a%2Fb}).
Twisted decodes C{%2F} before Klein routes, so these routes match a catch-all
and read the id from the raw request path.

Reads go through the read model (L{chatweb.sessions.Sessions}); changes go
through the adapter's optional L{ISessionManager} (a 501 without it), and
C{/stop} through the queue, which owns the delivery in flight.
"""

from __future__ import annotations

import base64
import binascii
from bisect import bisect_right
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from chatweb.importer import exportSession
from chatweb.interfaces import ISessionManager
from chatweb.model._values import Session
from chatweb.render._preview import messageSize
from chatweb.sessions import Sessions, SessionView, sessionDetail
from chatweb.web._errors import _error
from chatweb.web._json import _encodedJSON, _exportJSON, _json, _messagesJSON
from chatweb.web._messages import MAX_MESSAGE_ID, _readBody, _Refused
from chatweb.web._pages import (
    EXPORT_INLINE_CHARACTERS,
    EXPORT_INLINE_LIMIT,
    _mountPrefix,
    mergeSessionIds,
)
from chatweb.web._validation import (
    BadRequest,
    parseObject,
    sessionIdInPath,
    sessionIdProblem,
)

if TYPE_CHECKING:
    from chatweb.web._api import ChatWebAPI

#: Sessions per page of C{GET /sessions?detail=1}, unless C{limit} says.
DEFAULT_PAGE = 100
MAX_PAGE = 1000
#: The longest value C{PUT /session/{id}/FIELD} takes for a text field.
MAX_FIELD_LENGTH = 4096
#: The fields C{PUT /session/{id}/FIELD} sets, and the type of their value.
FIELDS: dict[str, type] = {
    "title": str,
    "pin": bool,
    "provider": str,
    "model": str,
    "cwd": str,
}


class _Answer(Exception):
    """
    The request is answered with C{body} (an error) before its work.
    """

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body


def _noContent(request: IRequest) -> bytes:
    request.setResponseCode(204)
    return b""


def rawSegments(request: IRequest, mountScript: str) -> list[bytes]:
    """
    The raw (still percent-encoded) path segments of C{request} below the
    path the API is mounted at.
    """
    uri = request.uri
    if uri.startswith(b"/"):
        path = uri.split(b"?", 1)[0].split(b"#", 1)[0]
    else:
        path = urlsplit(uri).path
    segments = path.split(b"/")[1:]
    mounted = [s for s in mountScript.split("/") if s]
    return segments[len(mounted):]


def _encodeCursor(sessionId: str) -> str:
    return base64.urlsafe_b64encode(sessionId.encode("utf-8")).decode("ascii").rstrip("=")


def _decodeCursor(value: bytes) -> str:
    try:
        padded = value + b"=" * (-len(value) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise BadRequest("query parameter 'cursor' is not a cursor this server gave")


def _oneArgument(request: IRequest, name: bytes) -> bytes | None:
    values = request.args.get(name)
    if values is None:
        return None
    if len(values) != 1:
        raise BadRequest(f"send query parameter '{name.decode()}' at most once")
    return values[0]


def _wholeNumber(value: bytes, name: str, smallest: int, largest: int) -> int:
    if not value.isdigit() or not value.isascii():
        raise BadRequest(f"query parameter '{name}' must be a whole number")
    # Not int() of a thousand digits: a number that long is too large.
    number = int(value) if len(value.lstrip(b"0")) <= 18 else largest + 1
    if not smallest <= number <= largest:
        raise BadRequest(f"query parameter '{name}' must be {smallest} to {largest}")
    return number


class SessionAPI:
    """
    The handlers of the session API, for L{ChatWebAPI}'s routes.
    """

    def __init__(self, api: ChatWebAPI) -> None:
        self._api = api
        self._queue = api._queue
        self._adapter = api._adapter
        self.sessions = Sessions(api._adapter, api._queue.journal, api._queue)

    # -- helpers

    def _segments(self, request: IRequest) -> list[bytes]:
        # _mountPrefix quotes the script name the way the raw path has it.
        return rawSegments(request, _mountPrefix(request))

    def _inProgress(self, sessionId: str) -> bool:
        return bool(self._adapter.isBusy(sessionId)) or (
            self._queue.deliveringNow(sessionId) is not None
        )

    def _detail(self, view: SessionView) -> dict[str, object]:
        return sessionDetail(view, self._inProgress(view.id))

    def _run(
        self,
        request: IRequest,
        method: bytes,
        work: Callable[[], Any],
    ) -> Any:
        """
        C{work()}, with its 4xx answers (L{BadRequest}, L{_Answer}) and a
        failing backend (503) turned into JSON errors.
        """
        refused = self._api._refuse(request, method)
        if refused is not None:
            return refused
        try:
            result = work()
        except BadRequest as e:
            return _error(request, 400, str(e))
        except _Answer as answer:
            return answer.body
        if isinstance(result, Deferred):

            def failed(failure: Any) -> Any:
                if failure.check(_Answer):
                    return failure.value.body
                if failure.check(BadRequest):
                    return _error(request, 400, str(failure.value))
                return self._api._unavailable(request, failure)

            return result.addErrback(failed)
        return result

    async def _view(self, request: IRequest, sessionId: str) -> SessionView:
        view = await self.sessions.get(sessionId)
        if view is None:
            raise _Answer(_error(request, 404, f"no session {sessionId!r}"))
        return view

    def _manager(self, request: IRequest) -> Any:
        manager = ISessionManager(self._adapter, None)
        if manager is None:
            raise _Answer(
                _error(
                    request,
                    501,
                    "this server's session backend does not support managing"
                    " sessions (its adapter does not provide ISessionManager)",
                )
            )
        return manager

    def _idle(self, request: IRequest, sessionId: str, what: str) -> None:
        if self._inProgress(sessionId):
            raise _Answer(
                _error(
                    request,
                    409,
                    f"session {sessionId!r} is in progress; it cannot be {what} now"
                    " (POST /session/{id}/stop stops it)",
                )
            )

    def _body(self, request: IRequest, optional: bool = False) -> dict[str, Any]:
        try:
            body = _readBody(request, self._api._limits.maxBodySize)
        except _Refused as refusal:
            raise _Answer(refusal.body)
        if optional and not body.strip():
            return {}
        return parseObject(body)

    # -- reading

    def getSessionResource(self, request: IRequest) -> Any:
        """
        C{GET /sessions/{id}} and C{GET /sessions/{id}/raw}.
        """

        def work() -> Any:
            segments = self._segments(request)[1:]
            if len(segments) == 2 and segments[1] == b"raw":
                return Deferred.fromCoroutine(self._raw(request, sessionIdInPath(segments[0])))
            if len(segments) != 1:
                return _error(request, 404, "not found")
            return Deferred.fromCoroutine(self._one(request, sessionIdInPath(segments[0])))

        return self._run(request, b"GET", work)

    async def _fromWorker(self, request: IRequest, kind: str, *args: Any) -> Any:
        """
        What the page workers answer (chatweb/web/_workers.py): this
        process does not read or encode the session.  Too many waiting: a
        503; a session there is not: a 404.
        """
        pages = self._api._pages
        busy = pages._tooBusy(request)
        if busy is not None:
            raise _Answer(await busy)
        answer = await pages.askWorker(kind, *args)
        if answer is None:
            raise _Answer(_error(request, 404, f"no session {args[0]!r}"))
        return answer

    async def _one(self, request: IRequest, sessionId: str) -> bytes:
        if self._api._pages.workerFree():
            detail = await self._fromWorker(request, "detail", sessionId)
            detail["in_progress"] = self._inProgress(sessionId)
            return _json(request, detail)
        return await self._oneHere(request, sessionId)

    async def _oneHere(self, request: IRequest, sessionId: str) -> bytes:
        view = await self._view(request, sessionId)
        return _json(request, self._detail(view))

    async def _raw(self, request: IRequest, sessionId: str) -> Any:
        if self._api.pageWorkers is not None:
            return _encodedJSON(request, await self._fromWorker(request, "export", sessionId))
        session = (await self._view(request, sessionId)).session
        if len(session.messages) <= EXPORT_INLINE_LIMIT and (
            sum(messageSize(m) for m in session.messages) <= EXPORT_INLINE_CHARACTERS
        ):
            return _json(request, exportSession(session))
        return _encodedJSON(
            request, await self._api._pages.inThread(request, _exportJSON, session)
        )

    def listDetailed(self, request: IRequest) -> Any:
        """
        C{GET /sessions?detail=1}: a page of detail objects, in id order;
        C{X-Next-Cursor} names the next page's C{cursor} when there is one.
        """

        def work() -> Any:
            limitValue = _oneArgument(request, b"limit")
            limit = (
                DEFAULT_PAGE
                if limitValue is None
                else _wholeNumber(limitValue, "limit", 1, MAX_PAGE)
            )
            cursorValue = _oneArgument(request, b"cursor")
            after = None if cursorValue is None else _decodeCursor(cursorValue)
            return Deferred.fromCoroutine(self._page(request, limit, after))

        return self._run(request, b"GET", work)

    async def _page(self, request: IRequest, limit: int, after: str | None) -> bytes:
        if self._api._pages.workerFree():
            pending = sorted(self._queue.sessionsWithPending())
            page, last = await self._fromWorker(request, "details", pending, limit, after)
            for detail in page:
                detail["in_progress"] = self._inProgress(str(detail["id"]))
            if last is not None:
                request.setHeader(b"X-Next-Cursor", _encodeCursor(last).encode())
            return _json(request, page)
        ids = await self.sessions.ids()
        failed = await self._queue.journal.failedSessions()
        every = mergeSessionIds(ids, set(failed) | self._queue.sessionsWithPending())
        if after is not None:
            every = every[bisect_right(every, after):]
        page = []
        for sessionId in every[:limit]:
            view = await self.sessions.get(sessionId)
            if view is not None:
                page.append(self._detail(view))
        if len(every) > limit:
            request.setHeader(b"X-Next-Cursor", _encodeCursor(every[limit - 1]).encode())
        return _json(request, page)

    def listMessages(self, request: IRequest) -> Any:
        """
        C{GET /messages?session=ID&since=N}: the session's messages, from the
        N-th (1-based) on.
        """

        def work() -> Any:
            value = _oneArgument(request, b"session")
            if not value:
                raise BadRequest("missing query parameter 'session'")
            try:
                sessionId = value.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest("query parameter 'session' is not valid UTF-8")
            problem = sessionIdProblem(sessionId)
            if problem is not None:
                raise BadRequest(f"query parameter 'session' {problem}")
            sinceValue = _oneArgument(request, b"since")
            since = (
                1 if sinceValue is None else _wholeNumber(sinceValue, "since", 0, 2**62)
            )
            return Deferred.fromCoroutine(self._messages(request, sessionId, since))

        return self._run(request, b"GET", work)

    async def _messages(self, request: IRequest, sessionId: str, since: int) -> bytes:
        if self._api._pages.workerFree():
            body = await self._fromWorker(request, "messages", sessionId, since)
            return _encodedJSON(request, body)
        view = await self._view(request, sessionId)
        chosen = view.session.messages[max(since - 1, 0) :]
        if len(chosen) <= EXPORT_INLINE_LIMIT and (
            sum(messageSize(m) for m in chosen) <= EXPORT_INLINE_CHARACTERS
        ):
            return _json(request, [m.asDict() for m in chosen])
        # Long: encoded on a thread that lets the reactor's run (on its own
        # thread, 120 MB of messages held it for 100 to 700 ms).
        return _encodedJSON(
            request, await self._api._pages.inThread(request, _messagesJSON, chosen)
        )

    def listProviders(self, request: IRequest) -> Any:
        """
        C{GET /providers}: the adapter's providers (the local backend's
        responder's); C{[]} for an adapter without any.
        """

        def work() -> bytes:
            providers = getattr(self._adapter, "providers", None)
            return _json(request, providers() if callable(providers) else [])

        return self._run(request, b"GET", work)

    def messageStatus(self, request: IRequest, messageId: int) -> Any:
        """
        C{GET /queue/{id}}: where a posted message is (pending, delivering,
        delivered, failed, discarded) and when it got there.
        """
        def work() -> Any:
            if messageId > MAX_MESSAGE_ID:
                return _error(request, 404, f"no queued message {messageId}")
            history = getattr(self._queue.journal, "messageHistory", None)
            if history is None:
                return _error(request, 501, "this server's journal cannot look messages up")
            return history(messageId).addCallback(self._status, request, messageId)

        return self._run(request, b"GET", work)

    def _status(self, found: Any, request: IRequest, messageId: int) -> bytes:
        message, events = found
        if message is None:
            return _error(request, 404, f"no queued message {messageId}")
        state = str(message.state)
        if state == "pending" and self._queue.deliveringNow(message.session) == messageId:
            state = "delivering"
        times: dict[str, float] = {"received": message.received}
        names = {
            "message.queued": "queued",
            "delivery.started": "delivery_started",
            "delivery.done": "delivered",
            "delivery.failed": "failed",
            "message.discarded": "discarded",
        }
        for event in events:
            times[names[event.kind.value]] = event.time
        return _json(
            request,
            {
                "id": message.id,
                "session": message.session,
                "state": state,
                "attempts": message.attempts,
                "last_error": message.lastError,
                "times": times,
                "updated": max(times.values()),
            },
        )

    # -- managing

    def newSession(self, request: IRequest) -> Any:
        """
        C{POST /session/new} with an optional C{{"provider", "model"}}.
        """

        def work() -> Any:
            manager = self._manager(request)
            data = self._body(request, optional=True)
            metadata: dict[str, Any] = {}
            for field in ("provider", "model"):
                if field in data and data[field] is not None:
                    metadata[field] = _fieldValue(field, data[field])
            if "provider" in metadata:
                _checkProvider(manager, metadata["provider"])
            return Deferred.fromCoroutine(self._create(request, manager, metadata))

        return self._run(request, b"POST", work)

    async def _create(self, request: IRequest, manager: Any, metadata: dict[str, Any]) -> bytes:
        sessionId = await manager.createSession(**metadata)
        # Read here, not by a page worker: the session exists now, and its
        # creator must not get a 503 for a worker's trouble (and retry).
        return await self._oneHere(request, sessionId)

    def sessionAction(self, request: IRequest, method: bytes) -> Any:
        """
        C{DELETE /session/{id}}, C{DELETE /session/{id}/messages/{index}},
        C{POST /session/{id}/stop|clear|retry}, C{PUT /session/{id}/FIELD}.
        """

        def work() -> Any:
            segments = self._segments(request)[1:]
            if not segments:
                return _error(request, 404, "not found")
            action = tuple(segments[1:])
            if method == b"POST" and action == (b"stop",):
                return Deferred.fromCoroutine(self._stop(request, sessionIdInPath(segments[0])))
            if method == b"POST" and action in ((b"clear",), (b"retry",)):
                manager = self._manager(request)
                sessionId = sessionIdInPath(segments[0])
                if action == (b"clear",):
                    return Deferred.fromCoroutine(self._clear(request, manager, sessionId))
                return Deferred.fromCoroutine(self._retry(request, manager, sessionId))
            if method == b"DELETE" and not action:
                manager = self._manager(request)
                return Deferred.fromCoroutine(
                    self._delete(request, manager, sessionIdInPath(segments[0]))
                )
            if method == b"DELETE" and len(action) == 2 and action[0] == b"messages":
                manager = self._manager(request)
                sessionId = sessionIdInPath(segments[0])
                index = action[1]
                if not (index.isascii() and index.isdigit() and 0 < len(index) <= 18):
                    raise BadRequest("the message index must be a whole number from 1")
                return Deferred.fromCoroutine(
                    self._deleteMessage(request, manager, sessionId, int(index))
                )
            if method == b"PUT" and len(action) == 1 and action[0].decode("latin-1") in FIELDS:
                manager = self._manager(request)
                sessionId = sessionIdInPath(segments[0])
                field = action[0].decode("ascii")
                data = self._body(request)
                if field not in data:
                    raise BadRequest(f"missing field '{field}'")
                value = _fieldValue(field, data[field])
                if field == "provider":
                    _checkProvider(manager, value)
                return Deferred.fromCoroutine(
                    self._update(request, manager, sessionId, field, value)
                )
            return _error(request, 404, "not found")

        return self._run(request, method, work)

    async def _stop(self, request: IRequest, sessionId: str) -> bytes:
        await self._view(request, sessionId)
        await self._queue.stopSession(sessionId)
        return _noContent(request)

    async def _clear(self, request: IRequest, manager: Any, sessionId: str) -> bytes:
        self._idle(request, sessionId, "cleared")
        if not await manager.clearSession(sessionId):
            raise _Answer(_error(request, 404, f"no session {sessionId!r}"))
        return _noContent(request)

    async def _delete(self, request: IRequest, manager: Any, sessionId: str) -> bytes:
        self._idle(request, sessionId, "deleted")
        if not await manager.deleteSession(sessionId):
            raise _Answer(_error(request, 404, f"no session {sessionId!r}"))
        return _noContent(request)

    async def _deleteMessage(
        self, request: IRequest, manager: Any, sessionId: str, index: int
    ) -> bytes:
        view = await self._view(request, sessionId)
        self._idle(request, sessionId, "changed")
        count = len(view.session.messages)
        if index > count:
            raise BadRequest(
                f"session {sessionId!r} has {count} messages; there is no message {index}"
            )
        try:
            found = await manager.deleteMessage(sessionId, index - 1)
        except IndexError:
            raise BadRequest(f"session {sessionId!r} has no message {index}")
        if not found:
            raise _Answer(_error(request, 404, f"no session {sessionId!r}"))
        return _noContent(request)

    async def _update(
        self, request: IRequest, manager: Any, sessionId: str, field: str, value: Any
    ) -> bytes:
        if not await manager.updateSession(sessionId, field, value):
            raise _Answer(_error(request, 404, f"no session {sessionId!r}"))
        return _noContent(request)

    async def _retry(self, request: IRequest, manager: Any, sessionId: str) -> bytes:
        view = await self._view(request, sessionId)
        self._idle(request, sessionId, "retried")
        if view.queued:
            # As chat.nvim's retry during its auto-retry: the message would
            # be asked twice (a failed one waits for its own retry).
            raise _Answer(
                _error(
                    request,
                    409,
                    f"session {sessionId!r} has {len(view.queued)} message(s) waiting to be"
                    f" delivered (message {view.queued[0].id} first); retry once they are,"
                    " or POST /session/{id}/stop to end a waiting retry",
                )
            )
        messages = view.session.messages
        index = retriable(view.session)
        if index is None:
            raise BadRequest(
                f"session {sessionId!r} has nothing to retry (no messages, or the"
                " last one sent to a model is not a user message)"
            )
        content = messages[index].content
        assert content is not None
        # The message is delivered again: it leaves the session, with what
        # followed it (an answer cut short, error records), and comes back
        # through the queue, so the session ends with it once.
        for position in reversed(range(index, len(messages))):
            await manager.deleteMessage(sessionId, position)
        message = await self._queue.post(sessionId, content)
        request.setHeader(b"X-Message-Id", str(message.id).encode("ascii"))
        return _noContent(request)


def retriable(session: Session) -> int | None:
    """
    The index of the message C{POST /session/{id}/retry} delivers again:
    as chat.nvim's retry, the last message a model would be sent, if it is
    a user's (after a stop or an error too: an answer cut short and the
    role-less records after it are not sent); else None.
    """
    indexes = session.conversationIndexes()
    if not indexes:
        return None
    last = session.messages[indexes[-1]]
    return indexes[-1] if last.role == "user" and isinstance(last.content, str) else None


def _checkProvider(manager: Any, name: str) -> None:
    """
    @raise BadRequest: if the adapter knows its providers and C{name} is
        not one of them (chat.nvim answers 400 for an invalid provider).
    """
    problem = getattr(manager, "providerProblem", None)
    reason = problem(name) if callable(problem) else None
    if reason is not None:
        raise BadRequest(reason)


def _fieldValue(field: str, value: Any) -> Any:
    """
    C{value} if it is a good value for the session field C{field}.

    @raise BadRequest: saying what is wrong with it.
    """
    kind = FIELDS[field]
    if kind is bool:
        if not isinstance(value, bool):
            raise BadRequest(f"field '{field}' must be true or false")
        return value
    if not isinstance(value, str):
        raise BadRequest(f"field '{field}' must be a string")
    if len(value) > MAX_FIELD_LENGTH:
        raise BadRequest(f"field '{field}' is longer than {MAX_FIELD_LENGTH} characters")
    if "\0" in value or not _validText(value):
        raise BadRequest(f"field '{field}' is not valid Unicode text")
    if field != "title" and not value.strip():
        raise BadRequest(f"field '{field}' must not be empty")
    return value


def _validText(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


__all__ = ["SessionAPI", "rawSegments"]
