"""
chatweb: push messages into chat sessions over HTTP.

The public API: run chatweb inside your own Twisted program with
L{ChatWebService}, give it your own backend by implementing
L{ISessionAdapter}, and test with L{chatweb.testing}.
"""

from chatweb.interfaces import IJournal, IResponder, ISessionAdapter
from chatweb.model import Delivery, Message, QueuedMessage, Session, Usage
from chatweb.queue import MessageQueue, RetryPolicy
from chatweb.service import ChatWebService

__all__ = [
    "ChatWebService",
    "Delivery",
    "IJournal",
    "IResponder",
    "ISessionAdapter",
    "Message",
    "MessageQueue",
    "QueuedMessage",
    "RetryPolicy",
    "Session",
    "Usage",
]
