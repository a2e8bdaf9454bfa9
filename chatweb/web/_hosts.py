"""
Host header names, for the check that keeps pages from being read through
DNS rebinding.
"""

from __future__ import annotations

#: Host names whose pages are always served: this machine's loopback.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def hostName(value: bytes) -> str | None:
    """
    The name in a Host header: lower case, without its port, IPv6 brackets
    or a trailing dot; None if it is not a host name at all.
    """
    try:
        text = value.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        name, rest = text[1:end], text[end + 1 :]
    elif text.count(":") > 1:
        # A bare IPv6 address: not valid in a Host header, but unambiguous.
        name, rest = text, ""
    else:
        name, colon, port = text.partition(":")
        rest = colon + port
    if rest and not (rest[0] == ":" and (rest[1:].isdigit() or not rest[1:])):
        return None
    if name.endswith("."):
        name = name[:-1]
    if not name or any(c in name for c in " \t/\\@[]"):
        return None
    return name


def normalizeAllowedHost(name: str) -> str:
    """
    An allowed host name as L{hostName} gives them (C{[::1]} is C{::1}), or
    C{*} for any host.

    @raise ValueError: if C{name} is not a host name, or carries a port.
    """
    name = name.strip()
    if name == "*":
        return name
    if (name.startswith("[") and not name.endswith("]")) or (
        not name.startswith("[") and name.count(":") == 1
    ):
        raise ValueError(f"allowed host {name!r}: give the name without a port")
    normal = hostName(name.encode("ascii", "replace"))
    if normal is None or "?" in normal:
        raise ValueError(f"allowed host {name!r} is not a host name")
    return normal
