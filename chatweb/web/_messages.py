"""
Posting messages and managing the queue: C{POST /}, C{GET /queue},
C{POST /queue/{id}/retry} and C{DELETE /queue/{id}}.
"""

from __future__ import annotations

import codecs
from email.message import EmailMessage
import hashlib
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from chatweb.errors import IdempotencyConflict, QueueFull, UnknownMessage, WrongState
from chatweb.limits import retryAfter
from chatweb.model._values import FAILED, PENDING, QueuedMessage
from chatweb.store._unreachable import logFailure
from chatweb.web._errors import _error
from chatweb.web._json import _json
from chatweb.web._validation import (
    BadRequest,
    parseMessage,
    sessionIdInPath,
    validateSessionId,
)

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
    return idempotencyKey(request.requestHeaders.getRawHeaders(b"idempotency-key"))


def idempotencyKey(values: list[bytes] | None) -> str | None:
    """
    The request's Idempotency-Key, from the header's values; None if it
    has none.

    @raise BadRequest: for more than one, or one that is not 1 to
        L{MAX_IDEMPOTENCY_KEY} printable ASCII characters.
    """
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


def _textBody(request: IRequest, body: bytes) -> str:
    """
    A text body as the message's content, decoded by the C{charset} of its
    Content-Type (UTF-8 when none is given).

    @raise BadRequest: for an empty body, an unknown charset, or bytes that
        are not text in it.
    """
    if not body:
        raise BadRequest("the request body is empty; it is the message's content")
    charset = "utf-8"
    contentType = request.getHeader(b"content-type")
    if contentType:
        message = EmailMessage()
        message["content-type"] = contentType.decode("latin-1")
        charset = message.get_param("charset", "utf-8") or "utf-8"  # type: ignore[assignment]
    try:
        codec = codecs.lookup(str(charset))
    except LookupError:
        raise BadRequest(f"unknown charset {str(charset)[:40]!r} in Content-Type") from None
    # Python's codecs include transforms (rot13, base64, zlib), which bytes
    # may not be decoded with: not text encodings.
    if not getattr(codec, "_is_text_encoding", True):
        raise BadRequest(f"charset {str(charset)[:40]!r} in Content-Type is not a text encoding")
    try:
        text = body.decode(codec.name)
    except (ValueError, LookupError):  # UnicodeError included (punycode, undefined)
        raise BadRequest(f"request body is not valid {str(charset).upper()[:40]}") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def keyedIdempotencyKey(apiKey: bytes, key: str) -> str:
    """
    An Idempotency-Key as the journal keeps it: each API key has its own.
    """
    return hashlib.sha256(apiKey).hexdigest()[:16] + ":" + key


def notQueued(failure: Any, session: str) -> tuple[int, str, bytes | None]:
    """
    The answer to a POST whose message was not queued: its status, its
    error message and its Retry-After (or None).
    """
    if failure.check(QueueFull):
        full = failure.value
        retry = retryAfter(full.retryAfter)
        if full.scope == "session":
            return (
                429,
                f"session {session!r} already has {full.limit} messages waiting;"
                " retry later",
                retry,
            )
        return 503, f"{full.limit} messages are waiting; retry later", retry
    if failure.check(IdempotencyConflict):
        return (
            422,
            "this Idempotency-Key was already used for another session or other content",
            None,
        )
    logFailure(_log, failure, "Could not store a message")
    return 503, "the message could not be stored; retry later", None


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

    def _admit(self, request: IRequest) -> bytes | _Refused:
        """
        The body of an authorized POST within the size limit, or the
        refusal to answer with.
        """
        refused = self._api._refuse(request, b"POST")
        if refused is not None:
            return _Refused(refused)
        try:
            return _readBody(request, self._api._limits.maxBodySize)
        except _Refused as refusal:
            return refusal

    def post(self, request: IRequest) -> Any:
        body = self._admit(request)
        if isinstance(body, _Refused):
            return body.body
        try:
            idempotencyKey = _idempotencyKey(request)
            session, content = parseMessage(body)
        except BadRequest as e:
            return _error(request, 400, str(e))
        return self._enqueue(request, session, content, idempotencyKey)

    def postText(self, request: IRequest) -> Any:
        """
        C{POST /sessions/{id}/messages}: the body is the message's content
        as text (ntfy style), for senders that can post a fixed payload but
        not build JSON; otherwise as C{POST /}.
        """
        # (They import this module.)
        from chatweb.web._pages import _mountPrefix
        from chatweb.web._sessionapi import rawSegments

        body = self._admit(request)
        if isinstance(body, _Refused):
            return body.body
        try:
            idempotencyKey = _idempotencyKey(request)
            segments = rawSegments(request, _mountPrefix(request))
            if len(segments) != 3 or segments[2] != b"messages":
                # /sessions/a%2Fmessages: the session "a/messages".
                return _error(request, 404, "not found")
            session = sessionIdInPath(segments[1])
            content = _textBody(request, body)
        except BadRequest as e:
            return _error(request, 400, str(e))
        return self._enqueue(request, session, content, idempotencyKey)

    def _enqueue(
        self, request: IRequest, session: str, content: str, idempotencyKey: str | None
    ) -> Any:
        """
        Queue a valid message; answer 204 with X-Message-Id, or the error.
        """
        limits = self._api._limits
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
            code, message, retry = notQueued(failure, session)
            if retry is not None:
                request.setHeader(b"Retry-After", retry)
            return _error(request, code, message)

        if idempotencyKey is not None:
            apiKey = self._api._authorized(request) or b""
            idempotencyKey = keyedIdempotencyKey(apiKey, idempotencyKey)
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
