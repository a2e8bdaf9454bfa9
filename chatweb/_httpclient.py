"""
The HTTP connection pool of chatweb's own requests (to model servers).
"""

from __future__ import annotations

from typing import Any

from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

#: The private names used here, by owner (tests/test_twisted_compat.py
#: checks that Twisted still has them).
PRIVATE_NAMES: dict[type, tuple[str, ...]] = {HTTPConnectionPool: ("_factory",)}


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


def quietPool(reactor: Any, persistent: bool = True) -> HTTPConnectionPool:
    """
    An L{HTTPConnectionPool} whose connections log nothing: Twisted logs
    "Starting factory" and "Stopping factory" for each (two lines for every
    model request, most of a server's log).
    """
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = _QuietClientFactory
    return pool
