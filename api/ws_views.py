"""The WebSocket views of a channel: its events as ``event`` messages, made once per process.

A subscription of a ``/v1/ws`` socket is a :class:`~tokenrelay.api.channel.Viewer` with
one of these views. Under ``tokenrelay api`` (api.ws_transport) it is :data:`WS_FRAMES`:
each event framed once per process and a batch joined once, shared by every socket at
the same place, written with one write per socket, as SSE frames are. Under a server
without pre-framed writes it is :data:`WS`: the message texts, made once per process,
sent one ``websocket.send`` each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from tokenrelay.api import ws_protocol as proto
from tokenrelay.api.channel import CHUNK_BYTES, CHUNK_FRAMES, Channel, Membership, _Frames
from tokenrelay.shared import events as ev

T = TypeVar("T")


class _Texts:
    """The WebSocket messages of a channel's events (from its ``base``), filled as asked."""

    __slots__ = ("items", "chunk")

    def __init__(self) -> None:
        self.items: list[str] = []
        # (pos, stop asked, stop given, messages): the batch the viewers at pos share
        self.chunk: tuple[int, int, int, Sequence[str]] = (-1, -1, -1, ())

    def trim(self, events: list[ev.Event], drop: int) -> None:
        del self.items[:drop]


def _extend(items: list[T], channel: Channel, stop: int,
            make: Callable[[str, ev.Event], T]) -> None:
    """Make the items of the channel's events up to ``stop`` (absolute), once each."""
    base = channel.base
    if len(items) < stop - base:
        gen_id = channel.gen_id
        items.extend(make(gen_id, event) for event in channel.events[len(items) : stop - base])


def _frame(gen_id: str, event: ev.Event) -> bytes:
    return proto.text_frame(proto.event_message(gen_id, event).encode())


class WebSocketView:
    """The channel's events as ``event`` messages (text), each made once per process: for
    a server without pre-framed writes (one ``websocket.send`` per message)."""

    empty: Sequence[str] = ()

    def take(self, channel: Channel, pos: int) -> tuple[Sequence[str], int, bool]:
        texts = channel.frames.get(self)
        if not isinstance(texts, _Texts):
            texts = _Texts()
            channel.frames[self] = texts
        stop = min(channel.end, pos + CHUNK_FRAMES)
        items = texts.items
        _extend(items, channel, stop, proto.event_message)
        cached_pos, cached_stop, given, batch = texts.chunk
        if cached_pos != pos or cached_stop != stop:
            start = pos - channel.base
            size, count = len(items[start]), 1
            while count < stop - pos and size + len(items[start + count]) <= CHUNK_BYTES:
                size += len(items[start + count])
                count += 1
            given, batch = pos + count, tuple(items[start : start + count])
            texts.chunk = (pos, stop, given, batch)
        terminal_at = channel.terminal_at
        return batch, given, terminal_at is not None and terminal_at < given

    async def prepare(self, channel: Channel, hub: Membership) -> None:
        return None

    async def catch_up(self, hub: Membership, gen_id: str, last: ev.StreamId | None
                       ) -> Callable[[list[ev.Event]], Sequence[str]]:
        return lambda events: [proto.event_message(gen_id, event) for event in events]


class WebSocketFrames:
    """The channel's events as whole WebSocket frames, each framed once per process, and
    joined per batch as SSE frames are (``_Frames``): one write per batch per socket."""

    empty = b""

    def take(self, channel: Channel, pos: int) -> tuple[bytes, int, bool]:
        frames = channel.frames.get(self)
        if not isinstance(frames, _Frames):
            frames = _Frames()
            channel.frames[self] = frames
        stop = min(channel.end, pos + CHUNK_FRAMES)
        _extend(frames.items, channel, stop, _frame)
        return frames.hand_out(channel, pos, stop)

    async def prepare(self, channel: Channel, hub: Membership) -> None:
        return None

    async def catch_up(self, hub: Membership, gen_id: str, last: ev.StreamId | None
                       ) -> Callable[[list[ev.Event]], bytes]:
        return lambda events: b"".join([_frame(gen_id, event) for event in events])


WS = WebSocketView()
WS_FRAMES = WebSocketFrames()
