"""What an idle viewer holds in the API process, allocation site by allocation site.

    python bench/viewer_memory.py                   # SSE, N = 2,000
    python bench/viewer_memory.py --ws --n 2000     # WebSocket viewers

The API process runs under ``tracemalloc`` (one frame per allocation) and dumps a
snapshot and a count of live objects by type when it gets SIGUSR1. The bench opens
10 viewers and closes them (warm-up), takes the first snapshot, opens N idle viewers
of one quiet generation (the same clients as scenario d and bench/ws.py), takes the
second, and prints the growth per viewer: by allocation site, by file, by object type.
Scenario d's RSS figure includes what tracemalloc cannot see (malloc of C extensions:
uvloop's and httptools' own structures, the kernel's socket buffers do not count in
RSS); the difference between the two is that part. Figures go to
bench/results/viewer_memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import wsclient  # noqa: E402
from bench.common import Stack, install_uvloop, machine_note, rss, save, wait_until  # noqa: E402
from bench.loadrun import create_generation  # noqa: E402
from bench.scenarios import FANOUT_ENV  # noqa: E402
from bench.sseclient import Viewer, open_many, request_bytes  # noqa: E402
from tests.stack import Process  # noqa: E402
from tokenrelay.cli.redis_server import free_port  # noqa: E402

TRACED = """
import collections, gc, pickle, runpy, signal, sys, tracemalloc
tracemalloc.start({frames})
taken = 0
def dump(signum, frame):
    global taken
    gc.collect()
    snapshot = tracemalloc.take_snapshot()
    types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    with open({out!r} + f".{{taken}}.tmp", "wb") as f:
        pickle.dump((snapshot, dict(types)), f)
    import os
    os.rename({out!r} + f".{{taken}}.tmp", {out!r} + f".{{taken}}")
    taken += 1
signal.signal(signal.SIGUSR1, dump)
sys.argv = ["tokenrelay", "api", "--port", {port!r}]
runpy.run_module("tokenrelay", run_name="__main__")
"""


class TracedApi(Process):
    """The API process as ``Stack`` starts it, under tracemalloc, snapshots on SIGUSR1."""

    def __init__(self, out: str, port: int, env: dict[str, str], frames: int = 1):
        self.name = "api0"
        self.log = tempfile.NamedTemporaryFile(prefix="tr-api-", suffix=".log", delete=False)
        code = TRACED.format(out=out, port=str(port), frames=frames)
        self.popen = subprocess.Popen([sys.executable, "-c", code], env=env,
                                      cwd=Path(__file__).resolve().parent.parent,
                                      stdout=self.log, stderr=subprocess.STDOUT)


async def snapshot(api: TracedApi, out: str, index: int) -> tuple[Any, dict[str, int]]:
    api.popen.send_signal(signal.SIGUSR1)
    path = Path(f"{out}.{index}")
    await wait_until(path.exists, 120, "the API's tracemalloc snapshot", interval=0.2)
    return _load(path)


def _load(path: Path) -> tuple[Any, dict[str, int]]:
    with path.open("rb") as f:
        loaded: tuple[Any, dict[str, int]] = pickle.load(f)
    path.unlink()
    return loaded


async def run(n: int, ws: bool, top: int, frames: int = 1) -> dict[str, Any]:
    protocol = "websocket" if ws else "sse"
    print(f"memory per idle {protocol} viewer by allocation site, N = {n} ({machine_note()})")
    out = tempfile.mktemp(prefix="tr-snap-")
    stack = Stack(apis=0, workers=0, env=FANOUT_ENV)
    port = free_port()
    api = TracedApi(out, port, stack.env, frames)
    stack.apis.append(api)
    stack.ports.append(port)
    try:
        stack.wait_ready(stack.url, 60)
        gen_id = create_generation(stack.url, 10)
        host = "127.0.0.1"
        request = request_bytes("GET", f"/v1/generations/{gen_id}/events", f"{host}:{port}")
        latencies: array = array("d")  # type: ignore[type-arg]

        async def open_viewers(count: int) -> list[tuple[Viewer, Any]]:
            if ws:
                return await wsclient.open_many(count, host, port, gen_id, latencies)
            return list(await open_many(count, host, port, lambda i: request, latencies))

        warm = await open_viewers(10)
        await wait_until(lambda: all(v.ids for v, _ in warm), 30, "warm-up viewers")
        for _, proto in warm:
            proto.close()
        await asyncio.sleep(1.0)  # let the server release them (a settle, not a condition)
        snap0, types0 = await snapshot(api, out, 0)
        rss0 = rss(api.pid)
        pairs = await open_viewers(n)
        await wait_until(lambda: all(v.ids or v.error for v, _ in pairs), 180,
                         f"{n} idle viewers to receive the queued event")
        await asyncio.sleep(1.0)
        snap1, types1 = await snapshot(api, out, 1)
        rss1 = rss(api.pid)
        errors = sum(1 for v, _ in pairs if v.error)
        for _, proto in pairs:
            proto.close()
    finally:
        stack.stop()
    traced = sum(s.size_diff for s in snap1.compare_to(snap0, "filename"))
    result: dict[str, Any] = {
        "protocol": protocol, "n": n, "errors": errors,
        "rss_kib_per_viewer": (rss1 - rss0) / n / 1024,  # inflated by tracemalloc's own traces
        "traced_kib_per_viewer": traced / n / 1024,
    }
    print(f"  traced by tracemalloc: {result['traced_kib_per_viewer']:.2f} KiB per viewer "
          f"(RSS under tracemalloc {result['rss_kib_per_viewer']:.1f}, {errors} errors)")
    for key in ("lineno", "filename"):
        rows = []
        for stat in snap1.compare_to(snap0, key)[:top]:
            frame = stat.traceback[0]
            where = f"{_short(frame.filename)}:{frame.lineno}" if key == "lineno" \
                else _short(frame.filename)
            rows.append({"where": where, "bytes_per_viewer": stat.size_diff / n,
                         "objects_per_viewer": stat.count_diff / n})
            print(f"  {key:8s} {stat.size_diff / n:8.0f} B {stat.count_diff / n:6.2f} objects  "
                  f"{where}")
        result[f"by_{key}"] = rows
    if frames > 1:  # where the largest sites were called from
        for stat in snap1.compare_to(snap0, "traceback")[:5]:
            print(f"  {stat.size_diff / n:8.0f} B per viewer allocated at:")
            for frame in stat.traceback:
                print(f"      {_short(frame.filename)}:{frame.lineno}")
    growth = sorted(((t, types1.get(t, 0) - types0.get(t, 0)) for t in types1),
                    key=lambda kv: -kv[1])[:top]
    result["objects_by_type"] = [{"type": t, "per_viewer": d / n} for t, d in growth]
    print("  gc-tracked objects per viewer: " + ", ".join(f"{t} {d / n:.2f}" for t, d in growth))
    return result


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    root = str(Path(__file__).resolve().parent.parent) + os.sep
    return filename.removeprefix(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--ws", action="store_true", help="WebSocket viewers instead of SSE")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--frames", type=int, default=1,
                        help="frames kept per allocation (> 1: also print the top call paths)")
    args = parser.parse_args()
    install_uvloop()
    started = time.monotonic()
    result = asyncio.run(run(args.n, args.ws, args.top, args.frames))
    name = "viewer_memory_ws" if args.ws else "viewer_memory"
    save(name, {"args": vars(args), "wall_s": time.monotonic() - started, **result})


if __name__ == "__main__":
    main()
