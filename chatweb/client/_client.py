"""
L{ChatWebClient}: chatweb's HTTP API as asynchronous calls over treq.
"""

from __future__ import annotations

import json
import re
from typing import Any, AsyncIterator, Callable, Mapping, cast
from urllib.parse import quote, urlsplit
import uuid

from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred, DeferredQueue
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web import client as webClient

from chatweb.limits import parseRetryAfter
from chatweb.model import Message
from chatweb.client._errors import (
    BadRequest,
    ChatWebError,
    Conflict,
    HTTPError,
    NotFound,
    Throttled,
    Unauthorized,
    Unavailable,
    UnknownMessage,
    UnknownSession,
    Unreachable,
)
from chatweb._sse import SSEDecoder, SSEError
from chatweb.client import _literal
from chatweb.client._values import (
    Answer,
    MessageStatus,
    Sent,
    SessionDetail,
    ShareLink,
    StreamEvent,
)

#: What treq raises when there is no answer to be had.
_UNREACHABLE = (
    netError.ConnectError,
    netError.DNSLookupError,
    netError.TimeoutError,
    netError.ConnectionLost,
    netError.ConnectionDone,
    webClient.ResponseNeverReceived,
    webClient.RequestTransmissionFailed,
    webClient.ResponseFailed,
)

_RETRIED = (429, 503)


class _Refused(Unreachable):
    """
    The server refused the connection (not up yet, restarting): the
    request was not sent, so sending it again is safe.
    """


def _retryAfter(response: Any, now: float) -> float | None:
    """
    The seconds of a response's C{Retry-After}, or None.
    """
    return parseRetryAfter((response.headers.getRawHeaders(b"retry-after") or [None])[0], now)


class ChatWebClient:
    """
    A client of one chatweb server.

        client = ChatWebClient("http://127.0.0.1:7777", key)
        sent = await client.send("ci", "Build completed successfully!")
        status = await client.status(sent.messageId)

    Every call is a coroutine that raises a L{ChatWebError}: L{Unauthorized},
    L{UnknownSession}, L{BadRequest}, ... for an error answer, L{Unreachable}
    when there is no answer.  Answers 429 and 503 are retried (C{retries}
    times, waiting what C{Retry-After} says, at most C{maxRetryWait}
    seconds) before they are raised, and so is a connection the server
    refused (not up yet, restarting: 0.5 s, then 1 s, 2 s...); a message
    keeps its idempotency key across those retries, so it is queued once.

    @param url: the server's base URL (with the path chatweb is mounted at,
        if any: C{http://host/chat}).
    @param http: a treq L{HTTPClient} (or L{treq.testing.StubTreq}); by
        default one of its own, with a connection pool that L{close} closes.
    @param clock: what retries and reconnections wait on (a
        L{twisted.internet.task.Clock} in tests).
    @param timeout: seconds to wait for each answer to start (None: no
        limit); for an event stream, for the server to open it.
    @param newIdempotencyKey: makes the key for each L{send} that is not
        given one.
    """

    def __init__(
        self,
        url: str,
        apiKey: str,
        http: Any = None,
        clock: IReactorTime | None = None,
        retries: int = 3,
        maxRetryWait: float = 60.0,
        timeout: float | None = 30.0,
        newIdempotencyKey: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        from twisted.internet import reactor

        self.url = url.rstrip("/")
        self._apiKey = apiKey
        self._pool: webClient.HTTPConnectionPool | None = None
        #: Where requests go, and their Host header: the URL itself, except
        #: for an IPv6 address, which treq cannot take (L{_literal}).
        self._requestURL = self.url
        self._host: str | None = None
        if http is None:
            import treq

            self._pool = webClient.HTTPConnectionPool(reactor)
            address = _literal.ipv6Host(self.url)
            if address is None:
                agent = webClient.Agent(reactor, pool=self._pool)
            else:
                agent = webClient.Agent.usingEndpointFactory(
                    reactor, _literal.LiteralEndpoints(reactor, address), pool=self._pool
                )
                self._requestURL = _literal.placeholderURL(self.url)
                self._host = _literal.hostHeader(self.url)
            http = treq.client.HTTPClient(agent)
        self._http = http
        self._clock = cast(IReactorTime, reactor) if clock is None else clock
        self.retries = retries
        self.maxRetryWait = maxRetryWait
        self.timeout = timeout
        self._newIdempotencyKey = newIdempotencyKey

    def __repr__(self) -> str:
        # Never the key.
        return f"<ChatWebClient {self.url}>"

    async def close(self) -> None:
        """
        Close the connections kept open for reuse (not needed with an
        C{http} client of the caller's own).
        """
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    # -- the calls

    async def send(
        self, session: str, content: str, idempotencyKey: str | None = None
    ) -> Sent:
        """
        Queue C{content} for C{session} (C{POST /}); it is on the server's
        disk when this returns.
        """
        key = idempotencyKey if idempotencyKey is not None else self._newIdempotencyKey()
        body = _jsonBody({"session": session, "content": content})
        response = await self._request(
            "POST",
            "/",
            data=body,
            headers={"Content-Type": "application/json", "Idempotency-Key": key},
        )
        await self._check(response)
        values = response.headers.getRawHeaders(b"x-message-id") or [b"0"]
        await response.content()
        return Sent(session, int(values[0]), key)

    async def sessions(self) -> list[str]:
        """
        Every session's id (C{GET /sessions}).
        """
        return cast("list[str]", await self._json("GET", "/sessions"))

    async def session(self, session: str) -> SessionDetail:
        """
        One session's detail (C{GET /sessions/{id}}).

        @raise UnknownSession: if it does not exist.
        """
        data = await self._json("GET", "/sessions/" + _segment(session), session=session)
        return SessionDetail.fromJSON(data)

    async def messages(self, session: str, since: int | None = None) -> list[Message]:
        """
        A session's messages, as chat.nvim stores them (C{GET /messages}),
        from the C{since}-th (1-based) if given.

        @raise UnknownSession: if it does not exist.
        """
        query = "/messages?session=" + quote(session, safe="")
        if since is not None:
            query += f"&since={since}"
        data = await self._json("GET", query, session=session)
        return [Message.fromDict(m) for m in data]

    async def status(self, messageId: int) -> MessageStatus:
        """
        Where a sent message is (C{GET /queue/{id}}).

        @raise UnknownMessage: if no message has that id.
        """
        data = await self._json("GET", f"/queue/{int(messageId)}", messageId=messageId)
        return MessageStatus.fromJSON(data)

    async def share(self, session: str, expiresIn: int | None = None) -> ShareLink:
        """
        A link that opens the session's page without the key
        (C{POST /session/share}), as an absolute URL.
        """
        request: dict[str, Any] = {"session": session}
        if expiresIn is not None:
            request["expires_in"] = expiresIn
        data = await self._json(
            "POST",
            "/session/share",
            session=session,
            data=_jsonBody(request),
            headers={"Content-Type": "application/json"},
        )
        base = urlsplit(self.url)
        return ShareLink(f"{base.scheme}://{base.netloc}{data['url']}", data["expires"])

    def events(self, session: str | None = None, lastEventId: int | None = None) -> EventStream:
        """
        The live events of C{session} (of every session if None), as an
        async iterator that reconnects (with C{Last-Event-ID}, so nothing is
        missed or repeated) when the server ends the stream.  Starts after
        event C{lastEventId} if given, else with the next event.

            async with client.events("ci") as stream:
                async for event in stream:
                    print(event.kind, event.data)
        """
        path = "/events" if session is None else f"/sessions/{_segment(session)}/events"
        return EventStream(self, path, session, lastEventId)

    async def ask(
        self, session: str, content: str, idempotencyKey: str | None = None
    ) -> Answer:
        """
        Send C{content} and wait until it is delivered: the answer holds the
        text of each assistant message its delivery added (C{--responder
        echo} answers with the same text; a session without a responder adds
        none).

        With an C{idempotencyKey} (see L{send}), a message already sent with
        it is not queued again: its answer is read from the events the
        server still keeps (its event log: a day by default).

        @raise ChatWebError: if the delivery fails for good, or the message
            was sent before and its events are no longer kept.
        """
        # With a key, the message may be one sent before: its events are
        # read from the start of what the server keeps.
        async with self.events(session, 0 if idempotencyKey is not None else None) as stream:
            await stream.connect()
            sent = await self.send(session, content, idempotencyKey)
            if idempotencyKey is not None:
                status = await self.status(sent.messageId)
                if status.state != "pending" and "queued" not in status.times:
                    raise ChatWebError(
                        f"message {sent.messageId} was sent before with this idempotency"
                        f" key and is {status.state}; its events are no longer kept"
                        " (the session's messages still are)"
                    )
            texts: list[str] = []
            error: str | None = None
            async for event in stream:
                if event.kind == "message.added" and event.data.get("delivery") == sent.messageId:
                    message = event.data.get("message") or {}
                    if message.get("role") == "assistant" and isinstance(
                        message.get("content"), str
                    ):
                        texts.append(message["content"])
                    elif message.get("role") is None and message.get("error") is not None:
                        # chat.nvim's error record: the answer is an error.
                        error = str(message["error"])
                elif event.data.get("message") != sent.messageId:
                    continue
                elif event.kind == "delivery.started":
                    # Another attempt: what an earlier one added is not
                    # this answer.
                    texts, error = [], None
                elif event.kind == "delivery.done":
                    if error is not None:
                        raise ChatWebError(
                            f"message {sent.messageId} was answered with an error: {error}"
                        )
                    return Answer(sent, tuple(texts))
                elif event.kind == "delivery.failed" and event.data.get("final"):
                    raise ChatWebError(
                        f"message {sent.messageId} failed: {event.data.get('error')}"
                    )
                elif event.kind == "message.discarded":
                    raise ChatWebError(f"message {sent.messageId} was discarded")
        raise ChatWebError("the event stream ended")  # pragma: no cover

    # -- HTTP

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"X-API-Key": self._apiKey, **(extra or {})}
        if self._host is not None:
            headers["Host"] = self._host
        return headers

    async def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        """
        One request; L{Unreachable} when no answer comes (within
        L{timeout} seconds, for the answer's start).
        """
        try:
            asked = self._http.request(method, self._requestURL + path, **kwargs)
        except (ValueError, UnicodeError) as e:
            # A host hyperlink cannot encode (an empty label, say).
            raise ChatWebError(f"cannot use the URL {self.url}: {e}") from None
        if self.timeout is not None:

            def noAnswer(result: object, timeout: float) -> None:
                # (Cancelled, the agent may fail otherwise than CancelledError.)
                raise Unreachable(f"no answer from chatweb at {self.url} within {timeout:g} s")

            asked.addTimeout(self.timeout, self._clock, onTimeoutCancel=noAnswer)
        try:
            return await asked
        except _UNREACHABLE as e:
            error = _Refused if isinstance(e, netError.ConnectionRefusedError) else Unreachable
            raise error(f"cannot reach chatweb at {self.url}: {_reason(e)}") from None

    async def _request(
        self, method: str, path: str, headers: Mapping[str, str] | None = None, **kwargs: Any
    ) -> Any:
        """
        A request, retried on 429 and 503 as the server's C{Retry-After}
        says, and when the server refused the connection after 0.5 s, 1 s,
        2 s... (the same body and headers each time).
        """
        attempt = 0
        while True:
            try:
                response = await self._send(
                    method, path, headers=self._headers(headers), **kwargs
                )
            except _Refused:
                if attempt >= self.retries:
                    raise
                wait = 0.5 * 2**attempt
            else:
                if response.code not in _RETRIED or attempt >= self.retries:
                    return response
                said = _retryAfter(response, self._clock.seconds())
                wait = float(2**attempt) if said is None else said
                await response.content()
            attempt += 1
            await deferLater(self._clock, min(wait, self.maxRetryWait))

    async def _json(
        self,
        method: str,
        path: str,
        session: str | None = None,
        messageId: int | None = None,
        **kwargs: Any,
    ) -> Any:
        response = await self._request(method, path, **kwargs)
        await self._check(response, session, messageId)
        return json.loads(await response.content())

    async def _check(
        self, response: Any, session: str | None = None, messageId: int | None = None
    ) -> None:
        """
        Raise the L{HTTPError} an error answer stands for.
        """
        code = response.code
        if code < 400:
            return
        body = await response.content()
        try:
            message = str(json.loads(body)["error"])
        except (ValueError, KeyError, TypeError):
            message = _notChatweb(body)
        raise _errorFor(code, message, session, messageId)


def _notChatweb(body: bytes) -> str:
    """
    What to say of an error answer without chatweb's JSON error (another
    server, a proxy, a path below which chatweb is not mounted): an HTML
    page's title, or the first line of text.
    """
    text = body[:4000].decode("utf-8", "replace")
    title = re.search(r"<title[^>]*>([^<]*)</title>", text, re.IGNORECASE)
    lines = (title.group(1) if title else text).strip().splitlines()
    said = " ".join(lines[0].split())[:120] if lines else "no explanation"
    return f"{said} (not chatweb's answer: is the URL chatweb's, with the path it is mounted at?)"


def _errorFor(code: int, message: str, session: str | None, messageId: int | None) -> HTTPError:
    if code == 401:
        return Unauthorized(code, message)
    if code == 404:
        if session is not None:
            return UnknownSession(code, message)
        if messageId is not None:
            return UnknownMessage(code, message)
        return NotFound(code, message)
    if code in (400, 413, 422):
        return BadRequest(code, message)
    if code == 409:
        return Conflict(code, message)
    if code == 429:
        return Throttled(code, message)
    if code >= 500:
        return Unavailable(code, message)
    return HTTPError(code, message)


def _jsonBody(value: Any) -> bytes:
    """
    C{value} as a JSON request body: UTF-8, not escaped (each escape takes
    6 or 12 bytes of the server's body limit).  A lone surrogate goes as
    such, for the server to refuse.
    """
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _segment(session: str) -> str:
    return quote(session, safe="")


def _reason(e: BaseException) -> str:
    reasons = getattr(e, "reasons", None)
    if reasons:
        first = reasons[0]
        e = first.value if isinstance(first, Failure) else first
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


class _End:
    def __init__(self, reason: Failure) -> None:
        self.reason = reason


class _Chunks(Protocol):
    """
    Hands a streamed body's chunks to a queue, then an L{_End}.
    """

    def __init__(self, queue: DeferredQueue[bytes | _End]) -> None:
        self._queue = queue

    def dataReceived(self, data: bytes) -> None:
        self._queue.put(data)

    def connectionLost(self, reason: Failure = Failure(netError.ConnectionDone())) -> None:
        self._queue.put(_End(reason))


#: The longest line of an event stream the client reads: an event holds a
#: whole message, and a model's answer may run to megabytes.
EVENT_LINE_LIMIT = 64 * 1024 * 1024


class EventStream:
    """
    A live event stream; see L{ChatWebClient.events}.

    @ivar lastEventId: the id of the last event it gave (where a
        reconnection resumes).
    @ivar reconnects: how many times it reconnected.
    @ivar maxFailedReconnects: reconnection attempts in a row that find no
        server before it gives up (L{Unreachable}); None: it never does.
    """

    maxFailedReconnects: int | None = 5

    def __init__(
        self, client: ChatWebClient, path: str, session: str | None, lastEventId: int | None
    ) -> None:
        self._client = client
        self._path = path
        self._session = session
        self.lastEventId = lastEventId
        self.reconnects = 0
        self._queue: DeferredQueue[bytes | _End] | None = None
        self._body: _Chunks | None = None
        self._parser = SSEDecoder(EVENT_LINE_LIMIT, errors="replace")
        self._ready: list[StreamEvent] = []
        self._closed = False
        #: The wait before the next reconnection, while there is one.
        self._waiting: Deferred[None] | None = None

    async def connect(self) -> None:
        """
        Open the stream (once the server answered, nothing sent after it is
        missed); L{__anext__} does it when needed.
        """
        if self._queue is not None:
            return
        headers = {"Accept": "text/event-stream"}
        if self.lastEventId is not None:
            headers["Last-Event-ID"] = str(self.lastEventId)
        response = await self._client._send(
            "GET", self._path, headers=self._client._headers(headers), unbuffered=True
        )
        await self._client._check(response, self._session)
        self._parser = SSEDecoder(EVENT_LINE_LIMIT, errors="replace")
        queue: DeferredQueue[bytes | _End] = DeferredQueue()
        self._body = _Chunks(queue)
        self._queue = queue
        response.deliverBody(self._body)

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self

    async def __anext__(self) -> StreamEvent:
        while not self._ready:
            if self._closed:
                raise StopAsyncIteration
            if self._queue is None:
                await self._reconnect()
                continue
            chunk = await self._queue.get()
            if isinstance(chunk, _End):
                self._queue = None
                continue
            try:
                for raw in self._parser.feed(chunk):
                    if raw.event == "overflow":
                        # The server closes this stream: resume where it says.
                        resume = json.loads(raw.data).get("last_event_id")
                        if isinstance(resume, int):
                            self.lastEventId = resume
                        continue
                    event = StreamEvent.fromText(raw.data)
                    self._ready.append(event)
            except SSEError as e:
                self.close()
                raise ChatWebError(f"chatweb's event stream cannot be read: {e}") from None
        event = self._ready.pop(0)
        self.lastEventId = event.id
        return event

    async def _reconnect(self) -> None:
        if self._body is None:
            await self.connect()
            return
        failed = 0
        while not self._closed:
            delay = (self._parser.retry or 2000) / 1000
            self._waiting = deferLater(self._client._clock, delay)
            try:
                await self._waiting
            except CancelledError:
                return  # closed meanwhile
            finally:
                self._waiting = None
            try:
                await self.connect()
                self.reconnects += 1
                return
            except Unreachable:
                failed += 1
                if self.maxFailedReconnects is not None and failed >= self.maxFailedReconnects:
                    raise

    def close(self) -> None:
        """
        Close the stream: iteration ends.
        """
        self._closed = True
        if self._waiting is not None:
            self._waiting.cancel()
        body, self._body = self._body, None
        transport = getattr(body, "transport", None)
        if transport is not None:
            transport.stopProducing()
        if self._queue is not None and self._queue.waiting:
            self._queue.put(_End(Failure(netError.ConnectionDone())))

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

