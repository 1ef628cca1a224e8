"""The WebSocket views of a channel (api.ws_views): messages and frames made once per process."""

from __future__ import annotations

import json

from websockets.frames import Frame
from websockets.streams import StreamReader

from tokenrelay.api.channel import Channel, Entry
from tokenrelay.api.ws_views import WS, WS_FRAMES


def entries(count: int, start: int = 0) -> list[Entry]:
    return [(f"1-{i}".encode(), {b"t": b"delta", b"d": f'{{"content":"{i}"}}'.encode()})
            for i in range(start, start + count)]


def texts_of(chunk: bytes) -> list[str]:
    """The messages of a run of frames, read by the websockets library's parser."""
    reader = StreamReader()
    reader.feed_data(chunk)
    reader.feed_eof()
    texts = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=False)
        try:
            next(parser)
        except StopIteration as parsed:
            texts.append(parsed.value.data.decode())
    return texts


async def test_messages_are_made_once_per_process_and_shared() -> None:
    """Viewers at the same place get the very same message strings, made once per event."""
    channel = Channel("gen_x", 100)
    channel.append(entries(5))
    first, stop, terminal = WS.take(channel, 0)
    second, _, _ = WS.take(channel, 0)
    assert stop == 5 and not terminal and len(first) == 5
    assert all(a is b for a, b in zip(first, second, strict=True))
    later, _, _ = WS.take(channel, 2)
    assert later[0] is first[2]
    assert json.loads(first[4]) == {"type": "event", "generation_id": "gen_x", "id": "1-4",
                                    "event": "delta", "data": {"content": "4"}}


async def test_frames_are_joined_once_per_batch_and_parse_as_the_messages() -> None:
    """Viewers at the same place share one joined bytes object; it is the frames of the
    very messages WS gives, one per event, and the terminal event is reported."""
    channel = Channel("gen_y", 100)
    channel.append(entries(3) + [(b"1-3", {b"t": b"done", b"d": b'{"finish_reason":"stop"}'})])
    chunk, stop, terminal = WS_FRAMES.take(channel, 0)
    again, _, _ = WS_FRAMES.take(channel, 0)
    assert chunk is again and stop == 4 and terminal
    assert texts_of(chunk) == list(WS.take(channel, 0)[0])


async def test_trimmed_channels_trim_their_messages() -> None:
    """When the channel drops its oldest events, its messages follow; positions stay valid."""
    channel = Channel("gen_z", 10)
    channel.append(entries(8))
    WS.take(channel, 0)
    WS_FRAMES.take(channel, 0)
    channel.append(entries(6, start=8))  # over the cap of 10: the oldest go
    assert channel.base > 0
    batch, stop, _ = WS.take(channel, channel.base)
    assert stop == channel.end
    assert [json.loads(m)["id"] for m in batch] == [e.id for e in channel.events]
    chunk, _, _ = WS_FRAMES.take(channel, channel.base)
    assert texts_of(chunk) == list(batch)
