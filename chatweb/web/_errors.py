"""
Error answers: JSON objects C{{"error": "..."}} with the status code.
"""

from __future__ import annotations

import json
from typing import Sequence

from twisted.web.iweb import IRequest

from chatweb.limits import retryAfter

#: The C{Server} header of every response: a name, no version.
SERVER_NAME = b"chatweb"

#: Reason phrases Twisted does not know.
_REASONS = {
    413: b"Content Too Large",
    421: b"Misdirected Request",
    422: b"Unprocessable Content",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
}


def _error(request: IRequest, code: int, message: str) -> bytes:
    request.setResponseCode(code, _REASONS.get(code))
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps({"error": message}).encode("utf-8")


def _notFound(request: IRequest) -> bytes:
    """
    A 404; for a path that werkzeug would redirect (C{/chat} for the API
    mounted at C{/chat/}, C{//}), with a hint.
    """
    return _error(
        request,
        404,
        "not found (the API's paths have no empty segments, and its root ends"
        " with a slash: POST /chat/ where it is mounted at /chat)",
    )


def _throttledMessage(wait: float) -> str:
    seconds = retryAfter(wait).decode()
    return (
        "too many failed authentications from this address; retry in"
        f" {seconds} second{'' if seconds == '1' else 's'}"
    )


def rawErrorResponse(
    code: int,
    reason: bytes,
    message: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
    serverName: bytes = SERVER_NAME,
    close: bool = True,
) -> bytes:
    """
    A complete HTTP/1.1 error response with a JSON body, for the cases where
    no request object answers (the connection is then closed, unless not
    C{close}): the same C{Server} and C{Cache-Control} headers as every
    other answer, and any C{headers} given (C{Retry-After} on a 429).
    """
    body = json.dumps({"error": message}).encode("utf-8")
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (code, reason),
            b"Server: %s\r\n" % (serverName,),
            b"Content-Type: application/json\r\n",
            b"Cache-Control: no-store\r\n",
            *(b"%s: %s\r\n" % (name, value) for name, value in headers),
            b"Content-Length: %d\r\n" % (len(body),),
            b"Connection: close\r\n\r\n" if close else b"\r\n",
            body,
        ]
    )
