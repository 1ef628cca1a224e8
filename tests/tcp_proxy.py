"""A TCP proxy in front of a real upstream, recording what crossed it.

It counts the chat-completion requests the client sent (so a test can tell one call
from a retried three), and the connections the client closed while a chunked
response was still unfinished (what a cancel must do to the upstream's stream).
A client close is passed on to the upstream at once; so is an upstream close.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from tokenrelay.cli.redis_server import free_port

REQUEST_LINE = b"POST /v1/chat/completions "
LAST_CHUNK = b"0\r\n\r\n"  # the end of a chunked HTTP body


class TcpProxy:
    """Listens on 127.0.0.1:``port`` (a free one by default), forwards to ``target_port``."""

    def __init__(self, target_port: int, port: int | None = None):
        self.target_port = target_port
        self.port = port or free_port()
        self.requests = 0  # chat-completion requests sent through
        self.client_closed_mid_response = 0  # client closes before a response's last chunk
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> TcpProxy:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        state = {"open": False, "tail": b""}  # a response is unfinished; the request bytes' tail

        async def client_to_upstream() -> None:
            try:
                while data := await client_r.read(65536):
                    seen = state["tail"] + data
                    sent = seen.count(REQUEST_LINE)
                    if sent:
                        self.requests += sent
                        state["open"] = True
                    state["tail"] = seen[-len(REQUEST_LINE):]
                    up_w.write(data)
                    await up_w.drain()
            except ConnectionError:
                pass  # a reset is a close too
            if state["open"]:
                self.client_closed_mid_response += 1

        async def upstream_to_client() -> None:
            last = b""
            while data := await up_r.read(65536):
                last = (last + data)[-len(LAST_CHUNK):]
                if last == LAST_CHUNK:
                    state["open"] = False
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.ensure_future(client_to_upstream()),
                 asyncio.ensure_future(upstream_to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass  # the proxy stops; ending quietly spares asyncio's callback a cancelled task
        finally:
            for task in tasks:
                task.cancel()
            for writer in (up_w, client_w):
                writer.close()
