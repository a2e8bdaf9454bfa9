"""
The throttle on failed authentication: wrong API keys and forged or
expired share tokens, counted per client address.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

from twisted.internet.interfaces import IReactorTime

#: Failures an address may make at once...
FAILURE_BURST = 20
#: ... and the failures per second it earns back.
FAILURE_RATE = 0.5
#: Addresses remembered at most (the oldest is forgotten first).
MAX_ADDRESSES = 10_000


def clientKey(address: Any) -> str:
    """
    Who a failure is counted against: an IPv4 address, an IPv6 /64 (one
    host usually holds a whole one), or the kind of address (all clients of
    a UNIX socket share one count).
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return type(address).__name__
    return _hostKey(host)


@functools.lru_cache(maxsize=4096)
def _hostKey(host: str) -> str:
    # Asked twice per request (before the body and in the guard): parsing
    # the address each time was 2 % of the reactor under POST load.
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class FailureThrottle:
    """
    A bucket of C{burst} failures per client, refilled at C{rate} per
    second.  A client whose bucket is empty is refused (whatever it sends)
    until a failure has been earned back: answering a right key from it
    while its wrong ones are refused would tell a guesser which guess was
    right.  Clients that make no failures are never counted or slowed.

    Memory is bounded: at most C{maxAddresses} clients are remembered, and
    a client whose bucket is full again is forgotten.
    """

    def __init__(
        self,
        clock: IReactorTime,
        burst: int = FAILURE_BURST,
        rate: float = FAILURE_RATE,
        maxAddresses: int = MAX_ADDRESSES,
    ) -> None:
        if burst < 1 or rate <= 0 or maxAddresses < 1:
            raise ValueError("burst, rate and maxAddresses must be positive")
        self._clock = clock
        self._burst = float(burst)
        self._rate = rate
        self._max = maxAddresses
        #: client -> (failures left, when that was counted); oldest first.
        self._clients: dict[str, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self._clients)

    def _left(self, client: str) -> float:
        now = self._clock.seconds()
        left, then = self._clients.get(client, (self._burst, now))
        return min(self._burst, left + max(0.0, now - then) * self._rate)

    def wait(self, client: str) -> float:
        """
        Seconds until C{client} may try again; 0 if it may now.
        """
        if client not in self._clients:
            return 0.0
        left = self._left(client)
        if left >= self._burst:
            del self._clients[client]
        if left >= 1:
            return 0.0
        return (1 - left) / self._rate

    def failed(self, client: str) -> None:
        """
        Count a failed authentication against C{client}.
        """
        left = max(0.0, self._left(client) - 1)
        self._clients.pop(client, None)
        self._clients[client] = (left, self._clock.seconds())
        while len(self._clients) > self._max:
            del self._clients[next(iter(self._clients))]
