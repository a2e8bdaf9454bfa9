"""
The limits that protect a chatweb process, in one value, and the per-key
request rate limiter.
"""

from __future__ import annotations

import email.utils
import math

import attrs
from twisted.internet.interfaces import IReactorTime


@attrs.frozen
class Limits:
    """
    Every limit chatweb enforces; each breach is a 4xx with a JSON error.

    @ivar maxBodySize: bytes of a request body (413).
    @ivar maxHeaderSize: bytes of the request line and headers (431).
    @ivar requestTimeout: seconds for a whole request to arrive once it has
        begun (408): slow clients cannot hold the server.
    @ivar idleTimeout: seconds an idle keep-alive connection stays open.
    @ivar maxContentLength: characters of a message's content (413).
    @ivar maxPendingPerSession: messages waiting in one session (429).
    @ivar maxPendingTotal: messages waiting in all sessions (503).
    @ivar rateLimit: requests per second per API key (429); 0 turns the rate
        limit off.
    @ivar rateBurst: requests a key may make at once before the rate applies.
    @ivar maxConnections: connections open at once; more are closed at once.
    """

    maxBodySize: int = 1024 * 1024
    maxHeaderSize: int = 16 * 1024
    requestTimeout: float = 30.0
    idleTimeout: float = 60.0
    maxContentLength: int = 256 * 1024
    maxPendingPerSession: int = 10_000
    maxPendingTotal: int = 1_000_000
    rateLimit: float = 0.0
    rateBurst: int = 100
    maxConnections: int = 1000


class RateLimiter:
    """
    A token bucket per key: C{burst} tokens, refilled at C{rate} per second.
    """

    def __init__(self, rate: float, burst: int, clock: IReactorTime) -> None:
        self._rate = rate
        self._burst = max(1, burst)
        self._clock = clock
        self._buckets: dict[bytes, tuple[float, float]] = {}

    @property
    def enabled(self) -> bool:
        return self._rate > 0

    def take(self, key: bytes) -> float:
        """
        Take a token for C{key}.

        @return: 0 if allowed, else the seconds until a token is free.
        """
        if not self.enabled:
            return 0.0
        now = self._clock.seconds()
        tokens, then = self._buckets.get(key, (float(self._burst), now))
        tokens = min(float(self._burst), tokens + (now - then) * self._rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / self._rate


def retryAfter(seconds: float) -> bytes:
    """
    A Retry-After header value: whole seconds, at least 1.
    """
    return b"%d" % max(1, math.ceil(seconds))


#: The longest wait a Retry-After header is believed for.
MAX_RETRY_AFTER = 3600.0


def parseRetryAfter(value: bytes | None, now: float) -> float | None:
    """
    Seconds to wait from a C{Retry-After} header (seconds or an HTTP date),
    at most L{MAX_RETRY_AFTER}; None if there is none or it is unreadable.
    """
    if not value:
        return None
    text = value.decode("latin-1").strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - now
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)
