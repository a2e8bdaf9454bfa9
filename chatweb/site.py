"""
The HTTP site: Twisted's L{Site} hardened for clients that misbehave.

  - the request body is limited before any route runs (413);
  - the request line and headers are limited (431), and every malformed
    request gets a JSON 400 before the connection is closed;
  - a request must arrive whole within C{requestTimeout} seconds of its
    first byte (408), so slow clients cannot hold the server;
  - no tracebacks in responses, and access logging only by choice.
"""

from __future__ import annotations

import io
import json

from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

DEFAULT_MAX_BODY = 1024 * 1024
DEFAULT_MAX_HEADERS = 16 * 1024
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 1000

_log = Logger()


def rawErrorResponse(code: int, reason: bytes, message: str) -> bytes:
    """
    A complete HTTP/1.1 error response with a JSON body, for the cases where
    the connection is closed before a request object can answer.
    """
    body = json.dumps({"error": message}).encode("utf-8")
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (code, reason),
            b"Content-Type: application/json\r\n",
            b"Content-Length: %d\r\n" % (len(body),),
            b"Connection: close\r\n\r\n",
            body,
        ]
    )


class LimitedRequest(Request):
    """
    A request whose body may not exceed C{site.maxBodySize} bytes: a larger
    declared length is refused at once, and a chunked body that grows past
    the limit is cut off; either way with a 413 and the connection closed.
    Bodies are kept in memory (they are small by construction), never
    spooled to a temporary file.
    """

    _tooLarge = False
    _received = 0

    def _limit(self) -> int:
        return getattr(self.channel.site, "maxBodySize", DEFAULT_MAX_BODY)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._refuseTooLarge()
            return
        # A body from a client without a valid key is refused before it is
        # read (no request without a key has one).
        authorize = getattr(self.channel.site, "authorizeHeaders", None)
        if (length is None or length > 0) and authorize is not None:
            if not authorize(self.requestHeaders):
                self._tooLarge = True
                self.content = io.BytesIO()
                self.channel._refuse(
                    401, b"Unauthorized", "missing or invalid X-API-Key header"
                )
                return
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self._tooLarge:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._refuseTooLarge()
            return
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._tooLarge:
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

    def _refuseTooLarge(self) -> None:
        self._tooLarge = True
        self.content = io.BytesIO()
        message = f"request body is larger than the limit of {self._limit()} bytes"
        refuse = getattr(self.channel, "_refuse", None)
        if refuse is not None:
            refuse(413, b"Content Too Large", message)
            return
        transport = self.channel.transport
        if transport is not None:
            transport.write(rawErrorResponse(413, b"Content Too Large", message))
        self.channel.loseConnection()


class ChatWebChannel(HTTPChannel):
    """
    An HTTP channel that answers bad requests in JSON and gives each request
    a deadline.
    """

    _deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        site = self.site
        site.openConnections += 1
        self.totalHeadersSize = site.maxHeaderSize
        self.MAX_LENGTH = site.maxHeaderSize
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None and not self._handlingRequest:
            self._deadline = self.callLater(self.site.requestTimeout, self._tooSlow)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._refuse(
                431,
                b"Request Header Fields Too Large",
                f"the request line and headers exceed {self.totalHeadersSize} bytes",
            )
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(
            431,
            b"Request Header Fields Too Large",
            f"a request or header line exceeds {self.MAX_LENGTH} bytes",
        )

    def allContentReceived(self) -> None:
        self._cancelDeadline()
        super().allContentReceived()

    def connectionLost(self, reason: Any) -> None:
        self.site.openConnections -= 1
        self._cancelDeadline()
        super().connectionLost(reason)

    def _cancelDeadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _send100Continue(self) -> None:
        # Not for a request already refused as too large.
        if self.requests and getattr(self.requests[-1], "_tooLarge", False):
            return
        super()._send100Continue()

    def _tooSlow(self) -> None:
        self._deadline = None
        if not self._handlingRequest:
            self._refuse(
                408,
                b"Request Timeout",
                f"the request did not arrive within {self.site.requestTimeout:g} seconds",
            )

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._refuse(400, b"Bad Request", "malformed HTTP request")

    def _refuse(self, code: int, reason: bytes, message: str) -> None:
        self._cancelDeadline()
        if self.transport is not None and not getattr(self, "_refused", False):
            self._refused = True
            self.transport.write(rawErrorResponse(code, reason, message))
        # Ignore whatever else the client sends until the connection closes.
        self.dataReceived = self.lineReceived = self.rawDataReceived = (  # type: ignore[method-assign]
            lambda *args: None
        )
        self.loseConnection()


def _channelFactory() -> _GenericHTTPChannelProtocol:
    return _GenericHTTPChannelProtocol(ChatWebChannel())


class ChatWebSite(Site):
    """
    The site that serves chatweb's resource.
    """

    displayTracebacks = False
    requestFactory = LimitedRequest
    protocol = staticmethod(_channelFactory)

    def __init__(
        self,
        resource: IResource,
        maxBodySize: int = DEFAULT_MAX_BODY,
        maxHeaderSize: int = DEFAULT_MAX_HEADERS,
        requestTimeout: float = DEFAULT_REQUEST_TIMEOUT,
        idleTimeout: float = DEFAULT_IDLE_TIMEOUT,
        maxConnections: int = DEFAULT_MAX_CONNECTIONS,
        accessLog: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            resource, parsePOSTFormSubmission=False, timeout=idleTimeout, **kwargs
        )
        self.maxBodySize = maxBodySize
        self.maxHeaderSize = maxHeaderSize
        self.requestTimeout = requestTimeout
        self.maxConnections = maxConnections
        self.openConnections = 0
        self.accessLog = accessLog
        #: C{Headers -> bool}: whether they carry a valid key; set by the
        #: service so that bodies without one are never read.
        self.authorizeHeaders: Any = None

    def buildProtocol(self, addr: Any) -> Any:
        # Past the limit, a new connection is closed at once (None).
        if self.openConnections >= self.maxConnections:
            return None
        return super().buildProtocol(addr)

    def log(self, request: Request) -> None:
        # The query string is left out: it may carry a share token.
        if self.accessLog:
            _log.info(
                "{method} {path} {code} {length}",
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("ascii", "replace"),
                code=request.code,
                length=request.sentLength,
            )
