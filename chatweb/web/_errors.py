"""
Error answers: JSON objects C{{"error": "..."}} with the status code.
"""

from __future__ import annotations

import json

from twisted.web.iweb import IRequest

from chatweb.limits import retryAfter

#: Reason phrases Twisted does not know.
_REASONS = {
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
    return (
        "too many failed authentications from this address; retry in"
        f" {retryAfter(wait).decode()} seconds"
    )
