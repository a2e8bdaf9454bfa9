"""
The typed results of L{chatweb.client.ChatWebClient}'s calls.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import attrs


@attrs.frozen
class Sent:
    """
    A message chatweb accepted (it is on disk and queued).

    @ivar messageId: its id, for L{ChatWebClient.status}.
    @ivar idempotencyKey: the key it was sent with (the same on every retry).
    """

    session: str
    messageId: int
    idempotencyKey: str


@attrs.frozen
class SessionDetail:
    """
    One session, as C{GET /sessions/{id}} describes it.
    """

    id: str
    title: str
    messageCount: int
    inProgress: bool
    pin: bool = False
    provider: str | None = None
    model: str | None = None
    cwd: str | None = None
    lastMessage: dict[str, Any] | None = None
    clearedAt: float | None = None

    @classmethod
    def fromJSON(cls, data: Mapping[str, Any]) -> SessionDetail:
        return cls(
            id=data["id"],
            title=data.get("title") or "",
            messageCount=data.get("message_count", 0),
            inProgress=bool(data.get("in_progress")),
            pin=bool(data.get("pin")),
            provider=data.get("provider"),
            model=data.get("model"),
            cwd=data.get("cwd"),
            lastMessage=data.get("last_message"),
            clearedAt=data.get("cleared_at"),
        )


@attrs.frozen
class MessageStatus:
    """
    Where a posted message is (C{GET /queue/{id}}).

    @ivar state: C{pending}, C{delivering}, C{delivered}, C{failed} or
        C{discarded}.
    @ivar times: the time of each step still in the event log
        (C{received}, C{queued}, C{delivery_started}, C{delivered}, ...).
    """

    id: int
    session: str
    state: str
    attempts: int
    lastError: str | None
    updated: float
    times: dict[str, float]

    @classmethod
    def fromJSON(cls, data: Mapping[str, Any]) -> MessageStatus:
        return cls(
            id=data["id"],
            session=data["session"],
            state=data["state"],
            attempts=data.get("attempts", 0),
            lastError=data.get("last_error"),
            updated=data.get("updated", 0.0),
            times=dict(data.get("times") or {}),
        )


@attrs.frozen
class ShareLink:
    """
    A link that opens a session's page without the key, until C{expires}
    (a Unix time).
    """

    url: str
    expires: float


@attrs.frozen
class StreamEvent:
    """
    One event of a live stream (C{GET /sessions/{id}/events}): C{kind} is
    the event's kind (C{message.added}, C{delivery.done}, ...; see
    docs/api.md), C{data} its payload.
    """

    id: int
    kind: str
    session: str
    time: float
    data: dict[str, Any]

    @classmethod
    def fromText(cls, text: str) -> StreamEvent:
        value = json.loads(text)
        return cls(
            id=value["id"],
            kind=value["kind"],
            session=value["session"],
            time=value["time"],
            data=value.get("data") or {},
        )


@attrs.frozen
class Answer:
    """
    What L{ChatWebClient.ask} waited for: the message, and the content of
    each assistant message its delivery added to the session.
    """

    sent: Sent
    texts: tuple[str, ...]
