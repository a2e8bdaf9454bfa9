"""
chatweb: push messages into chat sessions over HTTP.

The public API: run chatweb inside your own Twisted program with
L{ChatWebService}, give it your own backend by implementing
L{ISessionAdapter}, and test with L{chatweb.testing}.
"""

from chatweb.interfaces import IJournal, IResponder, ISessionAdapter
from chatweb.events import EventHub
from chatweb.model import Delivery, Event, EventKind, Message, QueuedMessage, Session, Usage
from chatweb.queue import MessageQueue, RetryPolicy
from chatweb.service import ChatWebService
from chatweb.sessions import Sessions, SessionView

__all__ = [
    "ChatWebService",
    "Delivery",
    "Event",
    "EventHub",
    "EventKind",
    "IJournal",
    "IResponder",
    "ISessionAdapter",
    "Message",
    "MessageQueue",
    "QueuedMessage",
    "RetryPolicy",
    "Session",
    "SessionView",
    "Sessions",
    "Usage",
]
