"""The Python around each viewer's write in a fan-out: one channel, N taken-over SSE viewers.

    python bench/fanout_micro.py --n 1000 --events 2000 --rounds 5

What ``bench/nchan.py``'s profile calls "the Python around the write": per event,
``Channel.append`` → ``notify`` → each parked ``DirectStream`` pumps its ``Viewer``
(poll, the shared SSE chunk, the write, parking again). The viewers are the real
classes (``api.channel``, ``api.sse``); only the socket is left out: each viewer's
transport counts the bytes it is given instead of calling ``write(2)``, so what is
timed is the code the relay can change, not the kernel's share (which nchan pays
too). Prints CPU per viewer-event (``time.process_time``), the best and median of
the rounds; the bytes written are checked against what the viewers should have got.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenrelay.api.channel import SSE, Channel, Viewer  # noqa: E402
from tokenrelay.api.sse import Connections, DirectStream  # noqa: E402
from tokenrelay.shared import events as ev  # noqa: E402


class CountingTransport:
    """Stands in for the socket: takes the bytes, makes no system call."""

    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False


class CountingLine:
    """The taken-over connection (``api.protocol.Line``) around a counting transport."""

    def __init__(self) -> None:
        self.transport = CountingTransport()

    def release(self) -> None:
        return None

    def reset(self) -> None:
        return None


class NoHub:
    """The viewers are given their channel; nothing joins, leaves or reads Redis."""

    async def join(self, gen_id: str) -> Channel:
        raise AssertionError("not used")

    def leave(self, channel: Channel) -> None:
        return None

    async def read_after(self, gen_id: str, after: ev.StreamId | None) -> list[ev.Event]:
        raise AssertionError("not used")


def entry(n: int) -> tuple[bytes, list[bytes]]:
    return (b"%d-0" % (n + 1), [b"t", b"delta", b"d", b'{"content":"token %d "}' % n])


async def one_round(n: int, events: int) -> float:
    loop = asyncio.get_running_loop()
    channel = Channel("gen_bench", max_events=4 * events)
    channel.append([entry(0)])
    channel.viewers = n  # as the hub's join counts them
    connections = Connections(15.0, 30.0)
    transports = []
    for i in range(n):
        viewer = Viewer(NoHub(), channel.gen_id, None, SSE, channel)
        viewer.prepared = True
        stream = DirectStream(loop, f"v{i}", viewer, connections, None)
        line = CountingLine()
        transports.append(line.transport)
        stream.start(line, draining=False)  # type: ignore[arg-type]  # writes event 0, parks
    first = transports[0].written
    started = time.process_time()
    for k in range(1, events + 1):
        channel.append([entry(k)])
    cpu = time.process_time() - started
    want = sum(len(ev.encode_event(event)) for event in channel.events)
    framed = sum(len(b"%x\r\n\r\n" % len(ev.encode_event(event))) for event in channel.events)
    got = {t.written for t in transports}
    assert got == {want + framed}, (got, want + framed, first)
    return cpu / (n * events) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="viewers")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    figures = [asyncio.run(one_round(args.n, args.events)) for _ in range(args.rounds)]
    print(f"fan-out, {args.n} viewers x {args.events} events: "
          f"{min(figures):.3f} us CPU per viewer-event (best of {args.rounds}), median "
          f"{statistics.median(figures):.3f}; rounds " + ", ".join(f"{f:.3f}" for f in figures))


if __name__ == "__main__":
    main()
