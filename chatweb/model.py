"""
Value types: sessions and messages in chat.nvim's session format, and the
queue's view of a message waiting for delivery.

chat.nvim stores a session as JSON; these types read and write that form
(L{Session.fromDict}, L{Session.asDict}) so that data moves between the two
without loss: keys this version does not know are kept in C{extra}.
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs

ROLES = ("user", "assistant", "tool")

_MESSAGE_KEYS = (
    "role",
    "content",
    "created",
    "reasoning_content",
    "tool_calls",
    "tool_call_id",
    "usage",
    "error",
    "on_complete",
    "tool_call_state",
)
_SESSION_KEYS = (
    "id",
    "messages",
    "provider",
    "model",
    "cwd",
    "prompt",
    "usage",
    "title",
    "pin",
)


def _extra(data: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in known}


def _optional(data: Mapping[str, Any], out: dict[str, Any], *keys: str) -> None:
    for key in keys:
        if data.get(key) is not None:
            out[key] = data[key]


@attrs.frozen
class Usage:
    """
    Token counts of one model answer (or a session's sum of them).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0

    @classmethod
    def fromDict(cls, data: Mapping[str, Any] | None) -> Usage | None:
        if not isinstance(data, Mapping):
            return None

        def count(value: Any) -> int:
            return value if isinstance(value, int) and value >= 0 else 0

        details = data.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, Mapping) else 0
        return cls(
            prompt_tokens=count(data.get("prompt_tokens")),
            completion_tokens=count(data.get("completion_tokens")),
            total_tokens=count(data.get("total_tokens")),
            cached_tokens=count(cached),
        )

    def asDict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
            self.cached_tokens + other.cached_tokens,
        )


@attrs.frozen
class Message:
    """
    One message of a session, as chat.nvim stores it.

    C{usage} and C{tool_calls} are kept as chat.nvim wrote them (plain JSON
    values) so that an exported session is the file that was imported;
    L{Message.tokenUsage} reads C{usage} as a L{Usage}.
    """

    role: str
    content: str | None = None
    created: float | None = None
    reasoning_content: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None
    on_complete: bool | None = None
    tool_call_state: dict[str, Any] | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)

    @property
    def tokenUsage(self) -> Usage | None:
        return Usage.fromDict(self.usage)

    @classmethod
    def fromDict(cls, data: Mapping[str, Any]) -> Message:
        """
        Read a message in chat.nvim's form; a value of the wrong type is
        dropped rather than trusted.
        """

        def typed(key: str, *types: type) -> Any:
            value = data.get(key)
            return value if isinstance(value, types) else None

        role = data.get("role")
        created = data.get("created")
        if isinstance(created, bool) or not isinstance(created, (int, float)):
            created = None
        return cls(
            role=role if isinstance(role, str) else "user",
            content=typed("content", str),
            created=created,
            reasoning_content=typed("reasoning_content", str),
            tool_calls=typed("tool_calls", list),
            tool_call_id=typed("tool_call_id", str),
            usage=typed("usage", dict),
            error=typed("error", str),
            on_complete=typed("on_complete", bool),
            tool_call_state=typed("tool_call_state", dict),
            extra=_extra(data, _MESSAGE_KEYS),
        )

    def asDict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out["role"] = self.role
        out["content"] = self.content
        _optional(
            attrs.asdict(self, recurse=False),
            out,
            "created",
            "reasoning_content",
            "tool_calls",
            "tool_call_id",
            "usage",
            "error",
            "on_complete",
            "tool_call_state",
        )
        return out


@attrs.frozen
class Session:
    """
    A chat session: its settings and its messages, in order.
    """

    id: str
    messages: tuple[Message, ...] = ()
    provider: str | None = None
    model: str | None = None
    cwd: str | None = None
    prompt: str | None = None
    usage: dict[str, Any] | None = None
    title: str | None = None
    pin: bool = False
    extra: dict[str, Any] = attrs.field(factory=dict)

    def totalUsage(self) -> Usage:
        """
        The sum of the token usage of every message that reports one.
        """
        total = Usage()
        for message in self.messages:
            usage = message.tokenUsage
            if usage is not None:
                total = total + usage
        return total

    def metadata(self) -> dict[str, Any]:
        """
        Everything but the messages, in chat.nvim's form.
        """
        out = self.asDict()
        del out["messages"]
        return out

    @classmethod
    def fromDict(cls, data: Mapping[str, Any], id: str | None = None) -> Session:
        def text(key: str) -> str | None:
            value = data.get(key)
            return value if isinstance(value, str) else None

        messages = data.get("messages")
        usage = data.get("usage")
        return cls(
            id=id if id is not None else str(data.get("id", "")),
            messages=tuple(
                Message.fromDict(m)
                for m in (messages if isinstance(messages, list) else ())
                if isinstance(m, Mapping)
            ),
            provider=text("provider"),
            model=text("model"),
            cwd=text("cwd"),
            prompt=text("prompt"),
            usage=usage if isinstance(usage, dict) else None,
            title=text("title"),
            pin=data.get("pin") is True,
            extra=_extra(data, _SESSION_KEYS),
        )

    def asDict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out["id"] = self.id
        out["messages"] = [m.asDict() for m in self.messages]
        _optional(
            attrs.asdict(self, recurse=False),
            out,
            "provider",
            "model",
            "cwd",
            "prompt",
            "usage",
            "title",
        )
        out["pin"] = self.pin
        return out


@attrs.frozen
class Delivery:
    """
    A message the queue hands to a session adapter.

    C{id} is unique and stable across restarts: a message may be handed over
    again after a crash, and an adapter that records C{id} can ignore the
    repeat (the default backend does).
    """

    id: int
    session: str
    content: str
    received: float


PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
DISCARDED = "discarded"


@attrs.frozen
class QueuedMessage:
    """
    A message as the journal keeps it: what was posted, and how its delivery
    went so far.
    """

    id: int
    session: str
    content: str
    received: float
    state: str = PENDING
    attempts: int = 0
    lastError: str | None = None
    #: True when the journal answered with a message stored earlier under
    #: the same idempotency key.
    duplicate: bool = attrs.field(default=False, eq=False)

    def asDict(self) -> dict[str, Any]:
        """
        The message as the API shows it.
        """
        return {
            "id": self.id,
            "session": self.session,
            "content": self.content,
            "received": self.received,
            "state": self.state,
            "attempts": self.attempts,
            "last_error": self.lastError,
        }

    def delivery(self) -> Delivery:
        return Delivery(self.id, self.session, self.content, self.received)
