"""
Reaching a server named by an IPv6 address (C{http://[::1]:7777}).

treq hands every URL to hyperlink, which encodes its host with IDNA and
fails on an IPv6 address.  So requests name a placeholder host instead,
carry the real C{Host} header, and an endpoint factory connects the
placeholder to the address.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

#: The host requests name (a reserved name: it never resolves).
PLACEHOLDER = "chatweb-ipv6-address.invalid"


def ipv6Host(url: str) -> str | None:
    """
    The IPv6 address C{url} names as its host, else None.
    """
    host = urlsplit(url).hostname
    if host is None or ":" not in host:
        return None
    try:
        return str(ipaddress.IPv6Address(host.split("%", 1)[0]))
    except ValueError:
        return None


def placeholderURL(url: str) -> str:
    """
    C{url} with its IPv6 host replaced by L{PLACEHOLDER}.
    """
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit(parts._replace(netloc=PLACEHOLDER + port))


def hostHeader(url: str) -> str:
    """
    The C{Host} header of requests to C{url}: its host and port as written.
    """
    netloc = urlsplit(url).netloc
    return netloc.rsplit("@", 1)[-1]


@implementer(IAgentEndpointFactory)
class LiteralEndpoints:
    """
    Connects every request to one IPv6 address (the only server a
    L{chatweb.client.ChatWebClient} talks to).
    """

    def __init__(self, reactor: Any, address: str) -> None:
        self._reactor = reactor
        self._address = address
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: Any) -> Any:
        endpoint = HostnameEndpoint(self._reactor, self._address, uri.port)
        if uri.scheme == b"https":
            creator = self._tls.creatorForNetloc(self._address.encode("ascii"), uri.port)
            return wrapClientTLS(creator, endpoint)
        return endpoint
