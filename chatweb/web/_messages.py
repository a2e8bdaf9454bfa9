"""
Posting messages and managing the queue: C{POST /}, C{GET /queue},
C{POST /queue/{id}/retry} and C{DELETE /queue/{id}}.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from chatweb.errors import IdempotencyConflict, QueueFull, UnknownMessage, WrongState
from chatweb.limits import retryAfter
from chatweb.model._values import FAILED, PENDING, QueuedMessage
from chatweb.web._errors import _error
from chatweb.web._json import _json
from chatweb.web._validation import BadRequest, parseMessage, validateSessionId

if TYPE_CHECKING:
    from chatweb.web._api import ChatWebAPI

MAX_IDEMPOTENCY_KEY = 255
#: Message ids are SQLite integers.
MAX_MESSAGE_ID = 2**63 - 1

_log = Logger()


class _Refused(Exception):
    """
    A request refused before its route's work; C{body} is the answer.
    """

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body


def _readBody(request: IRequest, limit: int) -> bytes:
    """
    The request body.  ChatWebSite refuses large bodies before they are
    read; this covers a Site of the embedding program's own.

    @raise _Refused: with the 413 answer, if it is larger than C{limit}.
    """
    body = request.content.read(limit + 1)
    if len(body) > limit:
        raise _Refused(
            _error(request, 413, f"request body is larger than the limit of {limit} bytes")
        )
    return body


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


class Messages:
    """
    The handlers of the message and queue routes of a L{ChatWebAPI}.
    """

    def __init__(self, api: ChatWebAPI) -> None:
        self._api = api
        self._queue = api._queue

    def _refuseMessage(
        self, request: IRequest, method: bytes, messageId: int
    ) -> bytes | None:
        """
        L{ChatWebAPI._refuse}, and a 404 for an id no message can have.
        """
        refused = self._api._refuse(request, method)
        if refused is None and messageId > MAX_MESSAGE_ID:
            refused = _error(request, 404, f"no queued message {messageId}")
        return refused

    def post(self, request: IRequest) -> Any:
        refused = self._api._refuse(request, b"POST")
        if refused is not None:
            return refused
        limits = self._api._limits
        try:
            body = _readBody(request, limits.maxBodySize)
        except _Refused as refusal:
            return refusal.body
        try:
            idempotencyKey = _idempotencyKey(request)
            session, content = parseMessage(body)
        except BadRequest as e:
            return _error(request, 400, str(e))
        if len(content) > limits.maxContentLength:
            return _error(
                request,
                413,
                f"field 'content' is longer than {limits.maxContentLength}"
                " characters",
            )

        def queued(message: QueuedMessage) -> bytes:
            request.setResponseCode(204)
            request.setHeader(b"X-Message-Id", str(message.id).encode("ascii"))
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
            apiKey = self._api._authorized(request) or b""
            idempotencyKey = hashlib.sha256(apiKey).hexdigest()[:16] + ":" + idempotencyKey
        return self._queue.post(session, content, idempotencyKey).addCallbacks(
            queued, failed
        )

    def listQueue(self, request: IRequest) -> Any:
        refused = self._api._refuse(request, b"GET")
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
            listed, lambda f: self._api._unavailable(request, f)
        )

    def retry(self, request: IRequest, messageId: int) -> Any:
        refused = self._refuseMessage(request, b"POST", messageId)
        if refused is not None:
            return refused
        return self._queue.retry(messageId).addCallbacks(
            lambda message: _json(request, message.asDict()),
            lambda f: self._queueError(request, f, messageId, "retried (only failed ones can be)"),
        )

    def discard(self, request: IRequest, messageId: int) -> Any:
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
        return self._api._unavailable(request, failure)
