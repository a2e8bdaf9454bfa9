"""
An incremental decoder of Server-Sent Events (C{text/event-stream}), for
both ends chatweb reads: a model server's streamed answer and chatweb's own
event streams (L{chatweb.client}).  Bytes go in as the network hands them
over, split anywhere (inside a line, between a CR and its LF, inside a
UTF-8 character), and whole events come out.
"""

from __future__ import annotations

import codecs
import re

import attrs

_EOL = re.compile("\r\n|\r|\n")

#: The longest line kept while waiting for its end: a server that never
#: ends a line cannot make its reader hold all it sends.
MAX_LINE = 4 * 1024 * 1024


class SSEError(ValueError):
    """
    The bytes are not an event stream: bad UTF-8 (when decoding strictly),
    or a line too long.
    """


@attrs.frozen
class SSEvent:
    """
    One dispatched event: its C{event} name ("message" when unnamed), its
    C{data} (several C{data:} lines joined by newlines), and the last C{id:}
    seen on the stream (it carries over to the events after it).
    """

    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """
    Feed it bytes (L{feed}); it returns the events they complete.  Follows
    the WHATWG rules: CR, LF and CRLF end lines, lines starting with a colon
    are comments, one space after the field's colon is dropped, an empty
    line dispatches the event if it has data.

    @ivar retry: the reconnection time in milliseconds the server asked for
        (C{retry:}), or None.
    """

    def __init__(self, maxLine: int = MAX_LINE, errors: str = "strict") -> None:
        """
        @param errors: C{"strict"} (bad UTF-8 is an L{SSEError}) or
            C{"replace"}.
        """
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors)
        #: The start of a line whose end has not arrived, and its length.
        self._text: list[str] = []
        self._size = 0
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._maxLine = maxLine
        self._started = False
        #: The last chunk ended with a CR, which ended its line at once (a
        #: live stream must not wait for the next byte): an LF that starts
        #: the next chunk belongs to it.
        self._afterCR = False
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEvent]:
        try:
            text = self._decoder.decode(chunk)
        except UnicodeDecodeError as e:
            raise SSEError(f"the stream is not UTF-8: {e.reason}") from None
        if not text:
            return []
        if not self._started:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._afterCR and text.startswith("\n"):
            text = text[1:]
        self._afterCR = text.endswith("\r")
        if not text:
            return []
        events: list[SSEvent] = []
        # What is kept holds no line end, so only new text can end a line:
        # a long line arriving in many chunks is neither copied nor scanned
        # again at each one.
        if _EOL.search(text) is None:
            self._text.append(text)
            self._size += len(text)
        else:
            buffered = "".join(self._text) + text
            position = 0
            for match in _EOL.finditer(buffered):
                event = self._line(buffered[position : match.start()])
                if event is not None:
                    events.append(event)
                position = match.end()
            rest = buffered[position:]
            self._text = [rest] if rest else []
            self._size = len(rest)
        if self._size > self._maxLine:
            raise SSEError(f"a line of the stream is longer than {self._maxLine} characters")
        return events

    @property
    def pending(self) -> bool:
        """
        True if bytes were fed that made no whole event yet: a stream that
        ends now was cut short.
        """
        return bool(self._text or self._data)

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
        elif field == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None
