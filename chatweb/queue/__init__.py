"""
The message queue: a FIFO per session, claims, the retry policy, the sweep.
"""

from chatweb.queue._queue import MessageQueue, RetryPolicy, describeFailure

__all__ = ["MessageQueue", "RetryPolicy", "describeFailure"]
