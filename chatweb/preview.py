"""
The HTML preview of a session: one self-contained page, rendered with
Jinja2 with autoescaping on, so nothing from a session is ever live markup.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Sequence

from jinja2 import Environment, PackageLoader, select_autoescape

from chatweb.model import QueuedMessage, Session

#: Headers of every HTML page: no scripts, nothing loaded from elsewhere.
SECURITY_HEADERS = {
    b"Content-Security-Policy": (
        b"default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
        b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-store",
}


def _timestamp(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    try:
        when = datetime.datetime.fromtimestamp(value, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return ""
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _prettyArguments(arguments: Any) -> str:
    """
    Tool-call arguments pretty-printed when they are JSON, raw otherwise.
    """
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return arguments
    try:
        return json.dumps(arguments, indent=2, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(arguments)


_environment = Environment(
    loader=PackageLoader("chatweb", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
_environment.filters["timestamp"] = _timestamp
_environment.filters["arguments"] = _prettyArguments


def renderSession(session: Session, queued: Sequence[QueuedMessage] = ()) -> str:
    """
    The page for C{session}; C{queued} lists messages not yet delivered.
    """
    return _environment.get_template("session.html").render(
        session=session, usage=session.totalUsage(), queued=list(queued)
    )
