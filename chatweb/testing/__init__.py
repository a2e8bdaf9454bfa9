"""
Helpers for tests of programs that use chatweb (and of chatweb itself).

  - L{MemoryAdapter}: an L{ISessionAdapter} whose sessions live in memory,
    whose busy state a test sets, and whose deliveries a test completes or
    fails by hand (or lets complete at once).
  - L{MemoryJournal}: an L{IJournal} in memory that answers synchronously, for
    queue tests driven by L{twisted.internet.task.Clock}.
  - L{startChatWeb}: a real L{ChatWebService} listening on 127.0.0.1 (a free
    port) for the length of one trial test, with a L{ChatWebClient} (and a
    treq client) for it.
  - L{chatWebInMemory}: chatweb's routes over an in-memory queue and
    adapter on a L{twisted.internet.task.Clock}, with a L{ChatWebClient}
    that reaches them through treq's StubTreq: nothing listens, and a test
    steps the sweep by advancing the clock.
  - L{ChatWebProcess}: the real C{twistd -n chatweb} as a child process,
    ended when the test ends.
"""

from chatweb.store._memory import MemoryJournal
from chatweb.testing._adapter import MemoryAdapter
from chatweb.testing._inprocess import RunningChatWeb, startChatWeb
from chatweb.testing._memory import InMemoryChatWeb, chatWebInMemory
from chatweb.testing._process import ChatWebProcess, twistdCommand

__all__ = [
    "ChatWebProcess",
    "InMemoryChatWeb",
    "MemoryAdapter",
    "MemoryJournal",
    "RunningChatWeb",
    "chatWebInMemory",
    "startChatWeb",
    "twistdCommand",
]
