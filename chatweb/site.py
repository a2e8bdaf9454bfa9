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

from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from chatweb.limits import Limits

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

    _refused = False
    _received = 0
    # Narrower than Request's own declarations: ChatWebSite builds these.
    channel: ChatWebChannel
    content: io.BytesIO  # type: ignore[assignment]  # Request declares None

    def gotLength(self, length: int | None) -> None:
        site = self.channel.site
        self.content = io.BytesIO()
        if length is not None and length > site.limits.maxBodySize:
            self._refuseTooLarge()
        # A body from a client without a valid key is refused before it is
        # read (no request without a key has one).
        elif (length is None or length > 0) and not site.authorizeHeaders(
            self.requestHeaders
        ):
            self._refuse(401, b"Unauthorized", "missing or invalid X-API-Key header")

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.channel.site.limits.maxBodySize:
            self._refuseTooLarge()
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

    def _refuseTooLarge(self) -> None:
        limit = self.channel.site.limits.maxBodySize
        self._refuse(
            413, b"Content Too Large", f"request body is larger than the limit of {limit} bytes"
        )

    def _refuse(self, code: int, reason: bytes, message: str) -> None:
        self._refused = True
        self.content = io.BytesIO()
        self.channel._refuse(code, reason, message)


class ChatWebChannel(HTTPChannel):
    """
    An HTTP channel that answers bad requests in JSON and gives each request
    a deadline.
    """

    _deadline: IDelayedCall | None = None
    _refused = False
    #: Set by the site's buildProtocol.
    site: ChatWebSite

    def connectionMade(self) -> None:
        site = self.site
        site.openConnections += 1
        self.totalHeadersSize = self.MAX_LENGTH = site.limits.maxHeaderSize
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None and not self._handlingRequest:
            self._deadline = self.callLater(self.site.limits.requestTimeout, self._tooSlow)
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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.openConnections -= 1
        self._cancelDeadline()
        super().connectionLost(reason)

    def _cancelDeadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _send100Continue(self) -> None:
        # Not for a request already refused.
        if self.requests and self.requests[-1]._refused:
            return
        super()._send100Continue()

    def _tooSlow(self) -> None:
        self._deadline = None
        if not self._handlingRequest:
            self._refuse(
                408,
                b"Request Timeout",
                f"the request did not arrive within {self.site.limits.requestTimeout:g} seconds",
            )

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._refuse(400, b"Bad Request", "malformed HTTP request")

    def _refuse(self, code: int, reason: bytes, message: str) -> None:
        self._cancelDeadline()
        if self.transport is not None and not self._refused:
            self._refused = True
            self.transport.write(rawErrorResponse(code, reason, message))
        # Ignore whatever else the client sends until the connection closes.
        self.dataReceived = self.lineReceived = self.rawDataReceived = (  # type: ignore[method-assign, assignment]
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
        limits: Limits = Limits(),
        accessLog: bool = False,
        authorizeHeaders: Callable[[Any], bool] = lambda headers: True,
        **kwargs: Any,
    ) -> None:
        """
        @param authorizeHeaders: C{Headers -> bool}, whether they carry a
            valid key: a request body without one is refused unread.
        """
        super().__init__(
            resource, parsePOSTFormSubmission=False, timeout=limits.idleTimeout, **kwargs
        )
        self.limits = limits
        self.accessLog = accessLog
        self.authorizeHeaders = authorizeHeaders
        self.openConnections = 0

    def buildProtocol(self, addr: Any) -> Any:
        # Past the limit, a new connection is closed at once (None).
        if self.openConnections >= self.limits.maxConnections:
            return None
        return super().buildProtocol(addr)

    def log(self, request: http.Request) -> None:
        # The query string is left out: it may carry a share token.
        if self.accessLog:
            _log.info(
                "{method} {path} {code} {length}",
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("ascii", "replace"),
                code=request.code,
                length=request.sentLength,
            )
