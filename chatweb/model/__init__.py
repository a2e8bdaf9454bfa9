"""
chatweb's values: sessions, messages and queued messages, as frozen attrs
classes with chat.nvim's JSON forms.
"""

from chatweb.model._values import (
    DELIVERED,
    DELIVERING,
    DISCARDED,
    FAILED,
    PENDING,
    ROLES,
    CancelReason,
    Delivery,
    Event,
    EventKind,
    Message,
    MessageState,
    QueuedMessage,
    Session,
    SessionPage,
    Usage,
)

__all__ = [
    "DELIVERED",
    "DELIVERING",
    "DISCARDED",
    "FAILED",
    "PENDING",
    "ROLES",
    "CancelReason",
    "Delivery",
    "Event",
    "EventKind",
    "Message",
    "MessageState",
    "QueuedMessage",
    "Session",
    "SessionPage",
    "Usage",
]
