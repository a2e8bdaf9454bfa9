"""
What a valid request body is: the rules of POST / and of share-link
requests, each breach a L{BadRequest} that says what was wrong.
"""

from __future__ import annotations

import json
import re
from urllib.parse import unquote_to_bytes
from typing import Any

from chatweb.web._share import DEFAULT_LIFETIME, MAX_LIFETIME

MAX_SESSION_ID = 256


class BadRequest(Exception):
    """
    The request is malformed; the message says how.
    """


def _jsonType(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _isValidUnicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: Characters that are invisible or turn the text around them (bidi
#: controls): in a session id they make two different ids look the same.
INVISIBLE_CHARACTERS = frozenset(
    "\u202a\u202b\u202c\u202d\u202e"  # embeddings and overrides
    "\u2066\u2067\u2068\u2069"  # isolates
    "\u200e\u200f\u061c"  # direction marks
    "\u200b\u200c\u200d\u2060\ufeff"  # zero-width characters
    "\u00ad\u180e"  # soft hyphen, Mongolian vowel separator
    "\u2028\u2029"  # line and paragraph separators
    "\ufff9\ufffa\ufffb\ufffe\uffff"  # annotation marks, noncharacters
    + "".join(chr(c) for c in range(0xE0000, 0xE0080))  # tags
)


def sessionIdProblem(value: Any) -> str | None:
    """
    What is wrong with C{value} as a session id, or C{None} when it is a
    good one: the one rule for POST /, share requests and imported files.

    A session id is a non-empty string of at most L{MAX_SESSION_ID}
    characters, valid Unicode, without control characters and without
    L{INVISIBLE_CHARACTERS}.
    """
    if not isinstance(value, str):
        return f"must be a string, not {_jsonType(value)}"
    if not value:
        return "must not be empty"
    if len(value) > MAX_SESSION_ID:
        return f"must be at most {MAX_SESSION_ID} characters"
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        return "must not contain control characters"
    invisible = next((c for c in value if c in INVISIBLE_CHARACTERS), None)
    if invisible is not None:
        return (
            "must not contain invisible or bidi control characters"
            f" (U+{ord(invisible):04X})"
        )
    if not _isValidUnicode(value):
        return "is not valid Unicode"
    return None


def validateSessionId(value: Any, field: str = "session") -> str:
    """
    C{value} if it is a good session id (see L{sessionIdProblem}).

    @raise BadRequest: saying what is wrong with it.
    """
    problem = sessionIdProblem(value)
    if problem is not None:
        raise BadRequest(f"field '{field}' {problem}")
    return value


#: The deepest nesting of arrays and objects a request body may have: a
#: fixed rule, rather than whatever the stack allows at the moment.
MAX_JSON_DEPTH = 512

_JSON_STRUCTURE = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _tooDeep(text: str) -> bool:
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return False
    depth = 0
    for token in _JSON_STRUCTURE.finditer(text):
        mark = token.group()
        if mark in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif mark in "]}":
            depth -= 1
    return False


def _uniqueKeys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A name given twice means what its reader decides (the last, here;
    # the first, for another): refused rather than guessed.
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise BadRequest(f"request body names {name!r} more than once")
            seen.add(name)
    return data


def parseObject(body: bytes) -> dict[str, Any]:
    """
    Read a JSON object from a request body.

    @raise BadRequest: saying what is wrong with it.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise BadRequest("request body is empty; expected a JSON object")
    if _tooDeep(text):
        raise BadRequest(
            f"request body is nested deeper than {MAX_JSON_DEPTH} levels"
        )
    try:
        data = json.loads(text, object_pairs_hook=_uniqueKeys)
    except json.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e.msg} at position {e.pos}")
    except (ValueError, RecursionError):
        raise BadRequest("request body is not valid JSON")
    if not isinstance(data, dict):
        raise BadRequest(
            f"request body must be a JSON object, not {_jsonType(data)}"
        )
    return data


def parseMessage(body: bytes) -> tuple[str, str]:
    """
    Read C{{"session": str, "content": str}} from a request body.

    @raise BadRequest: saying what is wrong with it.
    """
    data = parseObject(body)
    for field in ("session", "content"):
        if field not in data:
            raise BadRequest(f"missing field '{field}' (a string)")
    session = validateSessionId(data["session"])
    content = data["content"]
    if not isinstance(content, str):
        raise BadRequest(f"field 'content' must be a string, not {_jsonType(content)}")
    if not _isValidUnicode(content):
        raise BadRequest("field 'content' is not valid Unicode")
    return session, content


def parseShareRequest(body: bytes, sessionRequired: bool = True) -> tuple[str, int]:
    """
    Read C{{"session": str, "expires_in": seconds}} (C{expires_in} optional)
    from a request body.

    @raise BadRequest: saying what is wrong with it.
    """
    data = parseObject(body)
    session = ""
    if sessionRequired:
        if "session" not in data:
            raise BadRequest("missing field 'session' (a string)")
        session = validateSessionId(data["session"])
    lifetime = data.get("expires_in", DEFAULT_LIFETIME)
    if not isinstance(lifetime, int) or isinstance(lifetime, bool):
        raise BadRequest(
            "field 'expires_in' must be a whole number of seconds, not"
            f" {_jsonType(lifetime) if not isinstance(lifetime, float) else 'a fraction'}"
        )
    if not 0 < lifetime <= MAX_LIFETIME:
        raise BadRequest(
            f"field 'expires_in' must be 1 to {MAX_LIFETIME} seconds (7 days)"
        )
    return session, lifetime


#: A C{%} that does not start a two-digit hexadecimal escape.
_MALFORMED_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def decodePathSegment(segment: bytes) -> str:
    """
    A raw (percent-encoded) path segment as text.

    @raise BadRequest: for a malformed escape (C{%ZZ}, which would
        otherwise be taken literally) or bytes that are not UTF-8.
    """
    if _MALFORMED_ESCAPE.search(segment):
        raise BadRequest("the path holds a malformed percent-escape (write '%' as %25)")
    try:
        return unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the session id in the path is not valid UTF-8") from None


def sessionIdInPath(segment: bytes) -> str:
    """
    The session id of a raw path segment.

    @raise BadRequest: saying what is wrong with it.
    """
    sessionId = decodePathSegment(segment)
    problem = sessionIdProblem(sessionId)
    if problem is not None:
        raise BadRequest(f"the session id in the path {problem}")
    return sessionId
