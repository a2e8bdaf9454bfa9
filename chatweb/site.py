"""
The HTTP site: Twisted's L{Site} with the request body limited before any
route runs, no tracebacks in responses, and access logging by choice.
"""

from __future__ import annotations

import io
import json

from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

DEFAULT_MAX_BODY = 1024 * 1024

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

    def _refuseTooLarge(self) -> None:
        self._tooLarge = True
        self.content = io.BytesIO()
        limit = self._limit()
        transport = self.channel.transport
        if transport is not None:
            transport.write(
                rawErrorResponse(
                    413,
                    b"Content Too Large",
                    f"request body is larger than the limit of {limit} bytes",
                )
            )
        self.channel.loseConnection()


class ChatWebSite(Site):
    """
    The site that serves chatweb's resource.
    """

    displayTracebacks = False
    requestFactory = LimitedRequest

    def __init__(
        self,
        resource: IResource,
        maxBodySize: int = DEFAULT_MAX_BODY,
        accessLog: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.maxBodySize = maxBodySize
        self.accessLog = accessLog

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
