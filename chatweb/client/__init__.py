"""
A client of chatweb's HTTP API, asynchronous, over treq: what the
C{chatweb} command is built on, and what a Twisted program (or a test) uses
to talk to a chatweb server.

    from chatweb.client import ChatWebClient

    client = ChatWebClient("http://127.0.0.1:7777", key)
    sent = await client.send("ci", "Build completed successfully!")
    async for event in client.events("ci"):
        ...

docs/clients.md documents it.
"""

from chatweb.client._client import ChatWebClient, EventStream
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
from chatweb.client._values import (
    Answer,
    MessageStatus,
    Sent,
    SessionDetail,
    ShareLink,
    StreamEvent,
)

__all__ = [
    "Answer",
    "BadRequest",
    "ChatWebClient",
    "ChatWebError",
    "Conflict",
    "EventStream",
    "HTTPError",
    "MessageStatus",
    "NotFound",
    "Sent",
    "SessionDetail",
    "ShareLink",
    "StreamEvent",
    "Throttled",
    "Unauthorized",
    "Unavailable",
    "UnknownMessage",
    "UnknownSession",
    "Unreachable",
]
