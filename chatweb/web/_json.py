"""
JSON answers, and a session exported as a chat.nvim session file.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

from twisted.web.iweb import IRequest

from chatweb.importer import exportSession
from chatweb.model._values import Message, Session
from chatweb.render._preview import pause


def _json(request: IRequest, value: Any) -> bytes:
    return _encodedJSON(request, json.dumps(value, ensure_ascii=False).encode("utf-8"))


def _encodedJSON(request: IRequest, body: bytes) -> bytes:
    """
    C{body}, JSON already encoded (on a thread, by a page worker), as the
    answer.
    """
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return body


def _exportJSON(session: Session) -> bytes:
    """
    C{session} as a chat.nvim session file, in JSON (safe on a thread): the
    same bytes as one C{json.dumps}, made a message at a time, so that the
    reactor's thread gets the GIL in between.
    """
    fields = []
    for key, value in exportSession(session).items():
        if key == "messages" and isinstance(value, list):
            text = _listInPieces(value)
        else:
            text = json.dumps(value, ensure_ascii=False)
        fields.append(json.dumps(key, ensure_ascii=False) + ": " + text)
    return ("{" + ", ".join(fields) + "}").encode("utf-8")


def _messagesJSON(messages: Sequence[Message]) -> bytes:
    """
    C{messages} as a JSON list (safe on a thread, as L{_exportJSON}).
    """
    return _listInPieces(m.asDict() for m in messages).encode("utf-8")


def _listInPieces(values: Iterable[Any]) -> str:
    """
    C{values} as a JSON list, the same text as one C{json.dumps}, made a
    value at a time with a L{pause} between: on a thread, the reactor's
    gets the GIL in between.
    """
    parts = []
    for value in values:
        pause()
        parts.append(json.dumps(value, ensure_ascii=False))
    return "[" + ", ".join(parts) + "]"
