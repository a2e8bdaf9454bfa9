"""
The HTTP site: Twisted's L{Site} hardened for clients that misbehave.

  - the request body is limited before any route runs (413);
  - the request line and headers are limited (431), and every malformed
    request gets a JSON 400 before the connection is closed;
  - a request must arrive whole within C{requestTimeout} seconds of its
    first byte (408), so slow clients cannot hold the server;
  - no tracebacks in responses, access logging only by choice, and a
    C{Server} header that names no version.

When chatweb's API is mounted below a path of a larger site (C{mount}),
the body limit and the early refusal of requests without a key apply
under that path only: the host program's own routes keep Twisted's
behaviour.
"""

from __future__ import annotations

import io
import json
import re
from collections import deque

from typing import Any, Callable, Sequence, Union
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import Request as HTTPRequest
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from zope.interface import implementer

from chatweb.web._errors import _REASONS, SERVER_NAME, rawErrorResponse
from chatweb.web._guard import UNAUTHORIZED
from chatweb.web._fastpost import FastPost
from chatweb.web._twisted_compat import HTTPChannelHooks, betweenRequests
from chatweb.limits import Limits

_log = Logger()


#: C{request -> (code, reason, message)} or None: an answer for a request
#: that is refused as soon as its headers are in, before its body is read.
#: A refusal before the body is read: code, reason, message and, optionally,
#: headers (C{Retry-After}).
Refusal = Union[
    "tuple[int, bytes, str]", "tuple[int, bytes, str, Sequence[tuple[bytes, bytes]]]"
]
EarlyRefusal = Callable[[Any], "Refusal | None"]


def _segments(path: bytes) -> list[bytes]:
    """
    The path's segments as Twisted's resource tree sees them (each one
    percent-decoded).
    """
    return [unquote_to_bytes(segment) for segment in path.split(b"?", 1)[0][1:].split(b"/")]


_BARE_LF = re.compile(rb"(?<!\r)\n")


def _bareLineFeed(buffered: bytes, data: bytes) -> bool:
    """
    Whether the request line and headers that C{data} adds to what is
    C{buffered} of them end a line with a bare LF (its body may hold any).
    """
    head = buffered[-1:] + data
    end = head.find(b"\r\n\r\n")
    return _BARE_LF.search(head, 0, len(head) if end < 0 else end + 4) is not None


def underMount(target: bytes, mount: Sequence[bytes]) -> bool:
    """
    Whether a request target is at or below the path whose segments are
    C{mount} (C{[]}: the whole site).  A target that is not a path (C{*},
    an absolute URL) counts as under it.
    """
    if not mount or not target.startswith(b"/"):
        return True
    return _segments(target)[: len(mount)] == list(mount)


def findAPI(resource: IResource, depth: int = 4) -> tuple[list[bytes], Any] | None:
    """
    Where chatweb's API is in a resource tree, among the children put there
    with C{putChild}: its path's segments and the L{ChatWebAPI}; None if it
    is not found within C{depth} levels.
    """
    level: list[tuple[list[bytes], Any]] = [([], resource)]
    for _ in range(depth + 1):
        following: list[tuple[list[bytes], Any]] = []
        for path, node in level:
            api = getattr(node, "chatwebAPI", None)
            if api is not None:
                return path, api
            children = getattr(node, "children", None)
            if isinstance(children, dict):
                following.extend((path + [name], child) for name, child in children.items())
        level = following
    return None


def describeAddress(address: IAddress) -> str:
    """
    A listening or peer address for people: C{host:port}, or a UNIX
    socket's path as text.
    """
    port = getattr(address, "port", None)
    if port is not None:
        return f"{getattr(address, 'host', '')}:{port}"
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        return name.decode("utf-8", "backslashreplace")
    return str(name if name is not None else address)


#: Most chunks in a chunked request body (each may arrive in pieces, each
#: piece counted).
MAX_BODY_CHUNKS = 10_000


#: Bytes of an answer above which it is written a piece of L{ANSWER_PIECE}
#: bytes at a time, as the connection takes them: Twisted's transport joins
#: what it holds into one string on the reactor's thread (for 120 MB, about
#: 40 ms), and a slow reader would make it hold the whole answer twice.
LARGE_ANSWER = 1024 * 1024
ANSWER_PIECE = 64 * 1024


@implementer(IPushProducer)
class _InPieces:
    """
    Writes a large answer (and what is written after it) a piece at a
    time while the connection takes more; finishes the request after, if
    it was asked to meanwhile.
    """

    def __init__(self, request: LimitedRequest, data: bytes) -> None:
        self._request = request
        self._pending: deque[bytes] = deque([data])
        self._offset = 0
        self._paused = False
        self._stopped = False
        self.finishWhenWritten = False

    def add(self, data: bytes) -> None:
        self._pending.append(data)

    def resumeProducing(self) -> None:
        self._paused = False
        while self._pending and not self._paused and not self._stopped:
            data = self._pending[0]
            piece = data[self._offset : self._offset + ANSWER_PIECE]
            self._offset += ANSWER_PIECE
            if self._offset >= len(data):
                self._pending.popleft()
                self._offset = 0
            self._request._writePiece(piece)
        if not self._pending and not self._stopped:
            self._stopped = True
            self._request._piecesWritten(self.finishWhenWritten)

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        # The connection is gone.
        self._stopped = True
        self._pending.clear()


class LimitedRequest(Request):
    """
    A request whose body may not exceed C{site.maxBodySize} bytes: a larger
    declared length is refused at once, and a chunked body that grows past
    the limit is cut off; either way with a 413 and the connection closed.
    Bodies are kept in memory (they are small by construction), never
    spooled to a temporary file.
    """

    _refused = False
    _received = 0
    #: Chunks of a chunked body so far (None: the body has a length).
    _chunks: int | None = None
    #: A large answer being written a piece at a time.
    _inPieces: _InPieces | None = None
    # Narrower than Request's own declarations: ChatWebSite builds these.
    channel: ChatWebChannel
    content: io.BytesIO  # type: ignore[assignment]  # Request declares None
    #: Whether chatweb's limits apply: the request is under its mount.
    _guarded = True

    def gotLength(self, length: int | None) -> None:
        site = self.channel.site
        self._guarded = underMount(self.channel.currentTarget, site.mount)
        if not self._guarded:
            super().gotLength(length)
            return
        self.content = io.BytesIO()
        if length is None:
            self._chunks = 0
        if length is not None and length > site.limits.maxBodySize:
            self._refuseTooLarge()
        # A body from a client without a valid key is refused before it is
        # read (no request without a key has one).
        elif length is None or length > 0:
            refusal = site.refuseBeforeBody(self)
            if refusal is not None:
                self._refuse(*refusal)
            else:
                self._refuseEncoded()

    def _refuseEncoded(self) -> None:
        """
        Refuse a compressed body (C{Content-Encoding: gzip}, say) before it
        is read: chatweb reads bodies as they are sent.
        """
        codings = b",".join(self.requestHeaders.getRawHeaders(b"content-encoding", []))
        named = [c.strip().lower() for c in codings.split(b",") if c.strip()]
        if any(coding != b"identity" for coding in named):
            shown = codings.decode("latin-1")[:100]
            self._refuse(
                415,
                b"Unsupported Media Type",
                f"Content-Encoding {shown!r} is not supported: send the body uncompressed",
                [(b"Accept-Encoding", b"identity")],
            )

    def handleContentChunk(self, data: bytes) -> None:
        if not self._guarded:
            super().handleContentChunk(data)
            return
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.channel.site.limits.maxBodySize:
            self._refuseTooLarge()
            return
        if self._chunks is not None:
            # Twisted parses each chunk in Python: a megabyte of one-byte
            # chunks took 2 s of the reactor's CPU.
            self._chunks += 1
            if self._chunks > MAX_BODY_CHUNKS:
                self._refuse(
                    400,
                    b"Bad Request",
                    f"request body comes in more than {MAX_BODY_CHUNKS} chunks;"
                    " send it in fewer, larger ones (or with a Content-Length)",
                )
                return
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        # Twisted answers "OPTIONS *" itself, before any resource: refuse
        # every target that is not a path, like any other unknown request.
        if not self.path.startswith(b"/"):
            body = json.dumps({"error": "not found"}).encode("utf-8")
            self.setResponseCode(404)
            self.setHeader(b"Content-Type", b"application/json")
            self.setHeader(b"Content-Length", b"%d" % (len(body),))
            self.write(body)
            self.finish()
            return
        super().process()

    def write(self, data: bytes) -> None:
        # The headers go out with the first write: name no version in them.
        if not self.startedWriting:
            site = getattr(self, "site", None)
            name = getattr(site, "serverName", SERVER_NAME)
            self.responseHeaders.setRawHeaders(b"server", [name])
        if self._inPieces is not None:
            self._inPieces.add(data)
        elif len(data) > LARGE_ANSWER and self.producer is None and not self._disconnected:
            self._inPieces = _InPieces(self, data)
            self.registerProducer(self._inPieces, True)
            self._inPieces.resumeProducing()
        else:
            super().write(data)

    def _writePiece(self, data: bytes) -> None:
        super().write(data)

    def finish(self) -> None:
        if self._inPieces is not None:
            self._inPieces.finishWhenWritten = True
            return
        super().finish()

    def _piecesWritten(self, finish: bool) -> None:
        self._inPieces = None
        self.unregisterProducer()
        if finish and not self._disconnected and not self.finished:
            super().finish()

    def _refuseTooLarge(self) -> None:
        limit = self.channel.site.limits.maxBodySize
        self._refuse(
            413, _REASONS[413], f"request body is larger than the limit of {limit} bytes"
        )

    def _refuse(
        self,
        code: int,
        reason: bytes,
        message: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        self._refused = True
        self.content = io.BytesIO()
        self.channel._refuse(code, reason, message, headers)


class ChatWebChannel(HTTPChannelHooks):
    """
    An HTTP channel that answers bad requests in JSON and gives each request
    a deadline.

    @ivar currentTarget: the request target (path and query) of the request
        being received.
    """

    _deadline: IDelayedCall | None = None
    _refused = False
    #: Set by the site's buildProtocol.
    site: ChatWebSite
    #: Whether a request is whole and being answered.
    _processing = False
    #: Bytes of the request line and headers received so far, and lines
    #: (not counting a header's continuation lines).
    _headerBytes = 0
    _headerLines = 0
    currentTarget = b"/"
    #: A request taken by the site's L{FastPost} waits for its message to
    #: be stored; what the client sends meanwhile waits in C{_backlog}.
    _fastPending = False
    _backlog = b""
    #: The idle timeout, turned off while a fast answer is pending.
    _idleTimeOut: float | None = None
    _lost = False

    #: Whether the transport asked us to stop: its send buffer is full.
    _sendBlocked = False

    #: This end's address, asked of the socket once (Twisted asks for
    #: every request: a system call each).
    _host: Any = None

    def getHost(self) -> Any:
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def connectionMade(self) -> None:
        self.site.channelOpened(self)
        self.totalHeadersSize = self.MAX_LENGTH = self.site.limits.maxHeaderSize
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self._fastPending:
            # HTTP/1.1 answers in order: what follows waits for the answer.
            if data:
                self._backlog += data
                self._transport.pauseProducing()
            return
        fast = self.site.fastPost
        if (
            fast is not None
            and not self._refused
            and betweenRequests(self)
            and fast.reaches(self.site)
        ):
            parsed = fast.parse(data, self.totalHeadersSize, self.site.limits.maxBodySize)
            if parsed is not None:
                # Set first: the answer may come at once.
                self._fastPending = True
                if fast.answer(self, *parsed):
                    # A deadline that bytes before this request started
                    # (an extra CRLF Twisted ignores) has no request left.
                    self._cancelDeadline()
                    if self._fastPending:
                        # No idle timeout while it is stored (as Twisted);
                        # setTimeout(None) forgets the period: kept here.
                        self._idleTimeOut = self.setTimeout(None)
                    return
                self._fastPending = False
        if self._deadline is None and not self._processing:
            self._deadline = self.callLater(self.site.limits.requestTimeout, self._tooSlow)
        if (
            self.line_mode
            and not self._processing
            and b"\n" in data
            and _bareLineFeed(self._buffer, data)
        ):
            # Twisted would wait for a CRLF until the deadline's 408.
            self._refuse(
                400,
                b"Bad Request",
                "malformed HTTP request: the request line and headers must end"
                " with CRLF (\\r\\n), not a bare LF (\\n)",
            )
            return
        super().dataReceived(data)

    def pauseProducing(self) -> None:
        self._sendBlocked = True
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self._sendBlocked = False
        super().resumeProducing()

    @property
    def _transport(self) -> Any:
        # A TCP, TLS or UNIX transport: it produces, and can abort.
        return self.transport

    def fastAnswered(self, response: bytes, close: bool) -> None:
        """
        Write the answer of a request that L{FastPost} took, then read what
        came after it.
        """
        self._fastPending = False
        if self._lost or self._refused or self._transport.disconnecting:
            return
        self._transport.write(response)
        if close:
            self.persistent = False
            self.dataReceived = lambda data: None  # type: ignore[method-assign]
            self.loseConnection()
            return
        timeOut, self._idleTimeOut = self._idleTimeOut, None
        self.setTimeout(self.timeOut if timeOut is None else timeOut)
        backlog, self._backlog = self._backlog, b""
        if backlog:
            # Read on, unless the client does not read its answers (the
            # transport resumes reading, through resumeProducing, once it
            # does): as Twisted does after an answer.
            if not self._sendBlocked:
                self._transport.resumeProducing()
            self.dataReceived(backlog)

    def fastFailed(self, failure: Failure) -> None:
        """
        Answering a request that L{FastPost} took failed: log it and close
        the connection (nothing more can be said on it in order) once what
        was written is sent.
        """
        self._fastPending = False
        _log.failure("Could not answer a POST", failure)
        if not self._lost:
            self.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        # Only the request line and headers come here (bodies are raw data).
        self._headerBytes += len(line)
        if self._headerBytes > self.totalHeadersSize:
            self._refuse(
                431,
                b"Request Header Fields Too Large",
                f"the request line and headers exceed {self.totalHeadersSize} bytes",
            )
            return
        if line[:1] not in (b"", b" ", b"\t"):
            # The request line, then a header field each (Twisted would
            # answer more than maxHeaders with a bare 400).
            self._headerLines += 1
            if self._headerLines > self.maxHeaders + 1:
                self._refuse(
                    431,
                    b"Request Header Fields Too Large",
                    f"the request has more than {self.maxHeaders} header fields",
                )
                return
        requests = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > requests:
            # That was a request line: remember its target.
            parts = line.split(b" ")
            self.currentTarget = parts[1] if len(parts) == 3 else b""
        if not line:
            self._headerBytes = self._headerLines = 0

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(
            431,
            b"Request Header Fields Too Large",
            f"a request or header line exceeds {self.MAX_LENGTH} bytes",
        )

    def allContentReceived(self) -> None:
        self._cancelDeadline()
        self._processing = True
        self._headerBytes = self._headerLines = 0
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        if self._lost or getattr(self.transport, "disconnected", False):
            # The client is gone (an event stream ends as its connection
            # does, before this channel hears of it): what it sent after
            # this request is not run, as its answer could never reach it.
            self._dataBuffer = []
            self._backlog = b""
        if self.persistent:
            self._processing = False
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._cancelDeadline()
        try:
            super().connectionLost(reason)
        finally:
            self.site.channelClosed(self)

    def _cancelDeadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def shouldContinue(self) -> bool:
        # Not for a request already refused.
        return not (self.requests and self.requests[-1]._refused)

    def _tooSlow(self) -> None:
        self._deadline = None
        if not self._processing:
            self._refuse(
                408,
                b"Request Timeout",
                f"the request did not arrive within {self.site.limits.requestTimeout:g} seconds",
            )

    def badRequest(self) -> None:
        self._refuse(400, b"Bad Request", "malformed HTTP request")

    def _refuse(
        self,
        code: int,
        reason: bytes,
        message: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        self._cancelDeadline()
        if self.transport is not None and not self._refused:
            self._refused = True
            serverName = getattr(self.site, "serverName", SERVER_NAME)
            self.transport.write(rawErrorResponse(code, reason, message, headers, serverName))
        # Ignore whatever else the client sends until the connection closes.
        self.dataReceived = self.lineReceived = self.rawDataReceived = (  # type: ignore[method-assign, assignment]
            lambda *args: None
        )
        self.loseConnection()


def _anyHeaders(headers: Any) -> bool:
    return True


class ChatWebSite(Site):
    """
    The site that serves chatweb's resource, or a program's own resource
    tree with chatweb's API mounted in it (C{mount}).

    @ivar serverName: the C{Server} header of every response.
    """

    displayTracebacks = False
    requestFactory = LimitedRequest
    # HTTP/1.1 only: the limits above are written for it (Twisted's default
    # would switch a TLS connection that negotiates HTTP/2 to a protocol
    # that enforces none of them).
    protocol = ChatWebChannel  # type: ignore[assignment]  # a class is a factory
    serverName = SERVER_NAME

    def __init__(
        self,
        resource: IResource,
        limits: Limits = Limits(),
        accessLog: bool = False,
        authorizeHeaders: Callable[[Any], bool] | None = None,
        mount: bytes | str | None = None,
        refuseBeforeBody: EarlyRefusal | None = None,
        **kwargs: Any,
    ) -> None:
        """
        @param authorizeHeaders: C{Headers -> bool}, whether they carry a
            valid key: a request body without one is refused unread.
        @param mount: the path where chatweb's API is in C{resource}
            (C{b"/chat"} for C{root.putChild(b"chat", chatweb.resource)});
            the body limit and the early refusal apply below it only;
            C{"/"} is the whole site.  By default, the path where
            C{putChild} put chatweb's resource in C{resource}, else the
            whole site.
        @param refuseBeforeBody: instead of C{authorizeHeaders}, a function
            of the request (its headers in) that returns C{(code, reason,
            message)} to refuse it before its body is read, else None
            (L{chatweb.web.ChatWebAPI.refuseBeforeBody}).  By default, that
            of the API found in C{resource}.
        """
        super().__init__(
            resource, parsePOSTFormSubmission=False, timeout=limits.idleTimeout, **kwargs
        )
        self.limits = limits
        self.accessLog = accessLog
        #: Called with every finished request (request metrics).
        self.requestObservers: list[Callable[[Any], None]] = []
        found = findAPI(resource)
        if isinstance(mount, str):
            mount = mount.encode("utf-8")
        #: The mount path's segments ([] for the whole site).
        self.mount = (
            [s for s in _segments(mount) if s] if mount is not None
            else found[0] if found is not None
            else []
        )
        usesAPIChecks = (
            found is not None
            and authorizeHeaders is None
            and refuseBeforeBody in (None, found[1].refuseBeforeBody)
        )
        if authorizeHeaders is None:
            if refuseBeforeBody is None and found is not None:
                refuseBeforeBody = found[1].refuseBeforeBody
            authorizeHeaders = _anyHeaders
        self.authorizeHeaders = authorizeHeaders
        if refuseBeforeBody is None:

            def refuseBeforeBody(request: HTTPRequest) -> tuple[int, bytes, str] | None:
                if self.authorizeHeaders(request.requestHeaders):
                    return None
                return 401, b"Unauthorized", UNAUTHORIZED

        self.refuseBeforeBody = refuseBeforeBody
        #: Answers plain POSTs to the API's root without twisted.web's
        #: Request, when the API found is where its limits apply and its
        #: own checks decide who may post.
        self.fastPost: FastPost | None = None
        if (
            found is not None
            and usesAPIChecks
            and found[0] == self.mount
            and FastPost.takes(self, resource)
        ):
            self.fastPost = FastPost(found[1], self)
        #: The open connections.
        self.channels: set[ChatWebChannel] = set()
        self._allClosed: list[Deferred[None]] = []

    @property
    def openConnections(self) -> int:
        return len(self.channels)

    def buildProtocol(self, addr: Any) -> Any:
        # Past the limit, a new connection is closed at once (None).
        if self.openConnections >= self.limits.maxConnections:
            return None
        return super().buildProtocol(addr)

    def channelOpened(self, channel: ChatWebChannel) -> None:
        self.channels.add(channel)

    def channelClosed(self, channel: ChatWebChannel) -> None:
        self.channels.discard(channel)
        if not self.channels:
            waiting, self._allClosed = self._allClosed, []
            for d in waiting:
                d.callback(None)

    def closeConnections(self, timeout: float = 5.0) -> Deferred[None]:
        """
        Close every open connection once what is being written has been
        sent, or at once after C{timeout} seconds (a client that reads
        nothing); fires when all are closed.
        """
        if not self.channels:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._allClosed.append(d)
        channels = list(self.channels)
        for channel in channels:
            channel.loseConnection()

        def abort() -> None:
            for channel in channels:
                if channel in self.channels and channel.transport is not None:
                    # Every TCP/TLS/UNIX transport can abort; loseConnection otherwise.
                    transport = channel.transport
                    getattr(transport, "abortConnection", transport.loseConnection)()

        later = self.reactor.callLater(timeout, abort)

        def closed(result: None) -> None:
            if later.active():
                later.cancel()

        d.addCallback(closed)
        return d

    def log(self, request: http.Request) -> None:
        for observe in self.requestObservers:
            observe(request)
        # The query string is left out: it may carry a share token.
        if self.accessLog:
            _log.info(
                "{client} {method} {path} {code} {length}",
                client=describeAddress(request.getClientAddress()),
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("ascii", "replace"),
                code=request.code,
                length=request.sentLength,
            )
