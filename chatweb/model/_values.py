"""
Value types: sessions and messages in chat.nvim's session format, and the
queue's view of a message waiting for delivery.

chat.nvim stores a session as JSON; these types read and write that form
(L{Session.fromDict}, L{Session.asDict}) so that data moves between the two
without loss: keys this version does not know are kept in C{extra}.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Literal, Mapping, Sequence

import attrs

ROLES = ("user", "assistant", "tool")

#: Why the queue cancelled a delivery: POST /session/{id}/stop, the
#: delivery timeout, or chatweb stopping.
CancelReason = Literal["stop", "timeout", "shutdown"]

#: Each key chatweb reads, and the JSON type(s) it reads it as.  A known key
#: holding another type (or null) is kept in C{extra} as it was, so that
#: writing a message back gives exactly the keys and values that were read.
_MESSAGE_KEYS: dict[str, tuple[type, ...]] = {
    "role": (str,),
    "content": (str,),
    "created": (int, float),
    "reasoning_content": (str,),
    "tool_calls": (list,),
    "tool_call_id": (str,),
    "usage": (dict,),
    "error": (str,),
    "on_complete": (bool,),
    "tool_call_state": (dict,),
}
_SESSION_KEYS: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "messages": (list,),
    "provider": (str,),
    "model": (str,),
    "cwd": (str,),
    "prompt": (str,),
    "usage": (dict,),
    "title": (str,),
    "pin": (bool,),
    "last_user_message_time": (int, float),
    "cleared_at": (int, float),
}
_SESSION_METADATA = {
    k: v for k, v in _SESSION_KEYS.items() if k not in ("id", "messages")
}


def _isA(value: Any, types: tuple[type, ...]) -> bool:
    # JSON booleans are Python ints: a number field never takes one.
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _split(
    data: Mapping[str, Any], known: Mapping[str, tuple[type, ...]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    C{data} as (known keys holding the type chatweb reads, everything else).
    """
    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        if key in known and _isA(value, known[key]):
            fields[key] = value
        else:
            extra[key] = value
    return fields, extra


def _join(value: Any, keys: Mapping[str, tuple[type, ...]]) -> dict[str, Any]:
    """
    The known fields of C{value} that are set, then its C{extra}: the inverse
    of L{_split}.
    """
    out: dict[str, Any] = {}
    for key in keys:
        field = getattr(value, key)
        if field is not None:
            out[key] = field
    out.update(value.extra)
    return out


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

    Most have a C{role} (user, assistant or tool).  chat.nvim also writes
    records with no role and no content: C{{on_complete: true, usage,
    created}} after every completed answer, and C{{error, created}} when a
    request fails or is cancelled.  They are kept, shown and exported as
    they are, and never sent to a model (see L{Session.conversation}).

    C{usage} and C{tool_calls} are kept as chat.nvim wrote them (plain JSON
    values); L{Message.tokenUsage} reads C{usage} as a L{Usage}.  A key
    chatweb does not read, or a known key holding a value of another type,
    is kept in C{extra}: C{Message.fromDict(d).asDict() == d}.
    """

    role: str | None = None
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

    @property
    def forModel(self) -> bool:
        """
        True for a user, assistant or tool message: one a model may be
        given.  chat.nvim's role-less records (completion marks, errors) and
        any other role are history to show, never to send.
        """
        return self.role in ROLES

    @classmethod
    def fromDict(cls, data: Mapping[str, Any]) -> Message:
        """
        Read a message in chat.nvim's form.
        """
        fields, extra = _split(data, _MESSAGE_KEYS)
        return cls(**fields, extra=extra)

    def asDict(self) -> dict[str, Any]:
        """
        The message in chat.nvim's form: the keys it was read with, no
        others.
        """
        return _join(self, _MESSAGE_KEYS)


def cutShort(messages: Sequence[Message], index: int) -> bool:
    """
    Whether C{messages[index]} is an answer cut short (stopped, timed out,
    its stream ended early): an assistant's message followed at once by
    chat.nvim's error record.  chatweb keeps the part that arrived, to
    show; chat.nvim keeps none, so such a part is never sent to a model.
    """
    following = messages[index + 1] if index + 1 < len(messages) else None
    return (
        messages[index].role == "assistant"
        and following is not None
        and following.role is None
        and following.error is not None
    )


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
    pin: bool | None = None
    last_user_message_time: float | None = None
    cleared_at: float | None = None
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

    def conversation(self) -> tuple[Message, ...]:
        """
        The messages a model may be given: those with a role of L{ROLES},
        without chat.nvim's role-less completion and error records (as
        chat.nvim's own C{get_request_messages} does), nor the answers cut
        short that chatweb keeps to show (L{cutShort}; chat.nvim keeps none).
        """
        return tuple(self.messages[i] for i in self.conversationIndexes())

    def conversationIndexes(self) -> list[int]:
        """
        Where in C{messages} the messages of L{conversation} are.
        """
        every = self.messages
        return [i for i, m in enumerate(every) if m.forModel and not cutShort(every, i)]

    def metadata(self) -> dict[str, Any]:
        """
        Everything but the messages, in chat.nvim's form.
        """
        out = self.asDict()
        del out["messages"]
        return out

    @classmethod
    def fromDict(cls, data: Mapping[str, Any], id: str | None = None) -> Session:
        """
        Read a session in chat.nvim's form; C{id}, when given, is its id
        whatever C{data} says.  Messages that are not objects are dropped
        (L{chatweb.importer} refuses such files).
        """
        fields, extra = _split(data, _SESSION_KEYS)
        extra.pop("messages", None)
        messages = fields.pop("messages", ())
        rawId = extra.pop("id", "")
        if id is not None:
            fields["id"] = id
        elif "id" not in fields:
            fields["id"] = str(rawId)
        return cls(
            **fields,
            messages=tuple(
                Message.fromDict(m) for m in messages if isinstance(m, Mapping)
            ),
            extra=extra,
        )

    def asDict(self) -> dict[str, Any]:
        """
        The session in chat.nvim's form: the keys it was read with, no
        others (C{id} and C{messages} always).
        """
        out: dict[str, Any] = {
            "id": self.id,
            "messages": [m.asDict() for m in self.messages],
        }
        out.update(_join(self, _SESSION_METADATA))
        return out



@attrs.frozen
class SessionPage:
    """
    Part of a session, for a page that shows a few of its messages: read
    without reading (or decoding) every message of a long session.

    @ivar session: its settings, and the messages it holds: those from
        index C{first} of the whole session on.
    @ivar first: the index, in the whole session, of C{session.messages[0]}.
    @ivar total: how many messages the whole session has.
    @ivar usage: the sum of the token usage of all its messages
        (L{Session.totalUsage} of the whole session).
    """

    session: Session
    first: int
    total: int
    usage: Usage

    @classmethod
    def whole(cls, session: Session) -> SessionPage:
        """
        All of C{session}.
        """
        return cls(session, 0, len(session.messages), session.totalUsage())

@attrs.frozen
class Delivery:
    """
    A message the queue hands to a session adapter.

    C{id} is unique and stable across restarts: a message may be handed over
    again after a crash, and an adapter that records C{id} can ignore the
    repeat (the default backend does).

    C{emit}, when set, takes partial answer text as it is made (a streaming
    model's tokens): each call records and publishes a C{delivery.text}
    event of this delivery.  Backends call it if they stream; it is not
    part of equality.

    C{cancelReason}, when set (the queue sets it), says why the queue
    cancelled the delivery's Deferred: None until it does, then for good
    whether it was stopped on purpose, timed out (it is tried again) or cut
    by chatweb stopping (it is delivered again at the next start), so that
    an adapter keeping a cancelled answer can mark it truly.
    """

    id: int
    session: str
    content: str
    received: float
    emit: Callable[[str], Any] | None = attrs.field(default=None, eq=False, repr=False)
    cancelReason: Callable[[], CancelReason | None] | None = attrs.field(
        default=None, eq=False, repr=False
    )


class _StrEnum(str, enum.Enum):
    """
    An enum whose members are their string values (C{enum.StrEnum} needs
    Python 3.11; chatweb runs on 3.10).
    """

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class MessageState(_StrEnum):
    """
    Where a queued message is.  The values are what the journal stores (and
    compare equal to those strings).
    """

    PENDING = "pending"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    FAILED = "failed"
    DISCARDED = "discarded"


PENDING = MessageState.PENDING
DELIVERING = MessageState.DELIVERING
DELIVERED = MessageState.DELIVERED
FAILED = MessageState.FAILED
DISCARDED = MessageState.DISCARDED


class EventKind(_StrEnum):
    """
    What an L{Event} records.
    """

    MESSAGE_QUEUED = "message.queued"
    DELIVERY_STARTED = "delivery.started"
    DELIVERY_TEXT = "delivery.text"
    MESSAGE_ADDED = "message.added"
    DELIVERY_DONE = "delivery.done"
    DELIVERY_FAILED = "delivery.failed"
    MESSAGE_DISCARDED = "message.discarded"
    SESSION_CREATED = "session.created"
    SESSION_CHANGED = "session.changed"
    SESSION_CLEARED = "session.cleared"
    SESSION_DELETED = "session.deleted"


@attrs.frozen
class Event:
    """
    One change, as the event log keeps it: ids increase in the order the
    changes were committed.
    """

    id: int
    kind: EventKind = attrs.field(converter=EventKind)
    session: str
    time: float
    data: dict[str, Any] = attrs.field(factory=dict)

    def asJSON(self) -> dict[str, Any]:
        """
        The event as the API shows it (a JSON object).
        """
        return {
            "id": self.id,
            "kind": self.kind.value,
            "session": self.session,
            "time": self.time,
            "data": self.data,
        }


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
    state: MessageState = attrs.field(default=PENDING, converter=MessageState)
    attempts: int = 0
    lastError: str | None = None
    #: True when the journal answered with a message stored earlier under
    #: the same idempotency key.
    duplicate: bool = attrs.field(default=False, eq=False)
    #: After a requeue or discard: the state it was in before.
    previousState: MessageState | None = attrs.field(default=None, eq=False)

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
