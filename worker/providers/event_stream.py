"""A ``text/event-stream`` body, as an upstream sends it, read into the data of its events.

The ``openai:`` provider runs this once per token, on the bytes of each network read: it
does only what a Chat Completions stream needs of the format (WHATWG HTML, "Parsing an
event stream"), in as few steps per read as it can.
"""

from __future__ import annotations


class EventData:
    """Per stream: bytes in, in reads of any size; the data of each complete event out.

    Lines end with LF, CRLF or CR (a CRLF split between two reads is one line end). An
    event's ``data`` lines are joined with LF, one leading space of each value dropped;
    a blank line ends the event. Comments (lines that start with ``:``) and the other
    fields (``event``, ``id``, ``retry``) are skipped. An event with no ``data`` line is
    no event, and an event the stream ends in the middle of is dropped, as the format
    says. The data is handed out as the bytes sent (UTF-8 JSON, for OpenAI's chunks).
    """

    __slots__ = ("_after_cr", "_data", "_partial")

    def __init__(self) -> None:
        self._partial: list[bytes] = []  # the start of a line no read has ended yet
        self._data: list[bytes] = []  # the data lines of the event being read
        self._after_cr = False  # the last read ended with CR: an LF first in the next is its CRLF

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of each event that ``chunk`` completes, in order."""
        if not chunk:
            return []
        if self._after_cr and chunk[0] == 0x0A:
            chunk = chunk[1:]
        self._after_cr = chunk.endswith(b"\r")
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if not lines:  # no line ends here: keep the piece, join the pieces once one does
            if tail:
                self._partial.append(tail)
            return []
        if self._partial:
            self._partial.append(lines[0])
            lines[0] = b"".join(self._partial)
            self._partial.clear()
        if tail:
            self._partial.append(tail)
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    events.append(b"\n".join(data))
                    data.clear()
                continue
            name, _, value = line.partition(b":")
            if name == b"data":
                data.append(value[1:] if value.startswith(b" ") else value)
        return events
