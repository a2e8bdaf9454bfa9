"""
Server-Sent Events, parsed incrementally: bytes in, in chunks cut anywhere
(inside a line, between a CR and its LF, inside a UTF-8 character), events
out.
"""

from __future__ import annotations

import re

import attrs

_LINE_END = re.compile(rb"\r\n|\r|\n")


@attrs.frozen
class RawEvent:
    """
    One dispatched event, as the SSE standard defines it.

    @ivar lastEventId: the last C{id:} seen on the stream (it carries over
        to the events after it, per the standard).
    """

    kind: str
    data: str
    lastEventId: str


class EventStreamParser:
    """
    The HTML standard's event stream interpretation: C{feed} it bytes,
    get the events they complete.

    @ivar retry: the reconnection time in milliseconds the server asked
        for (C{retry:}), or None.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data: list[str] = []
        self._kind = ""
        self.lastEventId = ""
        self.retry: int | None = None
        #: The last chunk ended with a CR: an LF that starts the next one
        #: belongs to it.
        self._afterCR = False

    def feed(self, chunk: bytes) -> list[RawEvent]:
        if not chunk:
            return []
        if self._afterCR and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._afterCR = chunk.endswith(b"\r")
        self._buffer += chunk
        events: list[RawEvent] = []
        start = 0
        while True:
            match = _LINE_END.search(self._buffer, start)
            if match is None:
                break
            line = bytes(self._buffer[start : match.start()])
            start = match.end()
            event = self._line(line.decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
        del self._buffer[:start]
        return events

    def _line(self, line: str) -> RawEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._kind = value
        elif field == "id" and "\0" not in value:
            self.lastEventId = value
        elif field == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> RawEvent | None:
        data, kind = self._data, self._kind
        self._data, self._kind = [], ""
        if not data:
            return None
        return RawEvent(kind or "message", "\n".join(data), self.lastEventId)
