"""
chatweb's values: sessions, messages and queued messages, as frozen attrs
classes with chat.nvim's JSON forms.
"""

from chatweb.model._values import (
    DELIVERED,
    DISCARDED,
    FAILED,
    PENDING,
    ROLES,
    Delivery,
    Message,
    QueuedMessage,
    Session,
    Usage,
)

__all__ = [
    "DELIVERED",
    "DISCARDED",
    "FAILED",
    "PENDING",
    "ROLES",
    "Delivery",
    "Message",
    "QueuedMessage",
    "Session",
    "Usage",
]
