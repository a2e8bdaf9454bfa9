"""
An incremental decoder of Server-Sent Events (C{text/event-stream}), as
model servers stream their answers: bytes go in as the network hands them
over, split anywhere (inside a line, a CRLF pair or a UTF-8 sequence), and
whole events come out.
"""

from __future__ import annotations

import codecs
import re

import attrs

_EOL = re.compile("\r\n|\r|\n")

#: The longest line kept while waiting for its end: a server that never
#: ends a line cannot make chatweb hold all it sends.
MAX_LINE = 4 * 1024 * 1024


class SSEError(ValueError):
    """
    The bytes are not an event stream: bad UTF-8, or a line too long.
    """


@attrs.frozen
class SSEvent:
    """
    One dispatched event: its C{event} name ("message" when unnamed) and its
    C{data} (several C{data:} lines joined by newlines).
    """

    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """
    Feed it bytes (L{feed}); it returns the events they complete.  Follows
    the WHATWG parsing rules: CR, LF and CRLF end lines, lines starting with
    a colon are comments, one space after the field's colon is dropped, an
    empty line dispatches the event if it has data.
    """

    def __init__(self, maxLine: int = MAX_LINE) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._text = ""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._maxLine = maxLine
        self._started = False

    def feed(self, chunk: bytes) -> list[SSEvent]:
        try:
            text = self._decoder.decode(chunk)
        except UnicodeDecodeError as e:
            raise SSEError(f"the stream is not UTF-8: {e.reason}") from None
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        self._text += text
        events: list[SSEvent] = []
        position = 0
        while True:
            match = _EOL.search(self._text, position)
            # A CR last may be the first half of a CRLF: wait for more.
            if match is None or (
                match.group() == "\r" and match.end() == len(self._text)
            ):
                break
            event = self._line(self._text[position : match.start()])
            if event is not None:
                events.append(event)
            position = match.end()
        self._text = self._text[position:]
        if len(self._text) > self._maxLine:
            raise SSEError(f"a line of the stream is longer than {self._maxLine} characters")
        return events

    @property
    def pending(self) -> bool:
        """
        True if bytes were fed that made no whole event yet: a stream that
        ends now was cut short.
        """
        return bool(self._text.strip("\r") or self._data)

    def _line(self, line: str) -> SSEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SSEvent(
                data="\n".join(self._data), event=self._event or "message", id=self._id
            )
            self._data, self._event = [], ""
            return event
        if line.startswith(":"):
            return None
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._id = value
        return None
