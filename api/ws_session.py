"""One ``/v1/ws`` socket: its subscriptions, fed by the hub, and the client's messages.

    client messages (in order) ─ handle ─ parse ─▶ subscribe / create / cancel / auth ─▶ reply
    subscription task (one each) ─ Viewer.next ─▶ a batch of event frames ─┐
    ticker (api.sse.Connections) ─ idle ─▶ ping; send > timeout ─▶ drop the socket
                                                                            ▼
                                            the socket's Wire ─▶ one write per batch

A subscription is a :class:`~tokenrelay.api.channel.Viewer` of its generation's
channel with a WebSocket view (api.ws_views): each event's message is made and framed
once per process, shared by every socket at the same place, so a WebSocket viewer
costs Redis and the hub what an SSE viewer costs. A subscription task holds at most
one batch (``CHUNK_FRAMES`` events, ``CHUNK_BYTES``), and a send waits while the
socket's transport is over its high-water mark: what a slow socket holds is bounded.
The socket is one connection of the process's ticker: it gets a ``ping`` message when
it has been idle ``HEARTBEAT_S``, and is dropped when a send makes no progress for
``SEND_TIMEOUT_S``.

The socket itself is a :class:`Wire`: under ``tokenrelay api`` the connection the session
took over (api.ws_connection: callbacks, pre-framed writes, no task while idle); under any
other server the ASGI WebSocket, read by the app's own task (api.ws_asgi).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError
from starlette.websockets import WebSocketDisconnect

from tokenrelay.api import generations, threads
from tokenrelay.api import ws_protocol as proto
from tokenrelay.api.channel import View, Viewer
from tokenrelay.api.deps import DEFAULT_TENANT, AppState, Principal
from tokenrelay.api.schemas import GenerationCreate
from tokenrelay.api.sse import Connection
from tokenrelay.api.ws_views import WS, WS_FRAMES
from tokenrelay.shared import events as ev
from tokenrelay.shared.errors import NotFound, TokenRelayError, TooManyRequests, Unauthorized

logger = logging.getLogger(__name__)

# A send that fails because the socket is gone (ClientDisconnected is an OSError; Starlette
# raises RuntimeError after a close and WebSocketDisconnect when uvicorn says so).
GONE = (OSError, RuntimeError, WebSocketDisconnect)


class Wire(Protocol):
    """How a session writes to its socket."""

    @property
    def frames(self) -> bool:
        """Whether it takes pre-framed batches (``send_frames``), else message texts."""

    async def send_texts(self, texts: Sequence[str]) -> None:
        """Send messages in order; raises an OSError (or a GONE error) if the socket is gone."""

    async def send_frames(self, frames: bytes) -> None:
        """Write whole frames (only if ``frames``)."""

    def ping(self) -> None:
        """The heartbeat: a ``ping`` message (the ticker found the socket idle)."""

    def close(self, code: int, reason: str) -> None:
        """Close the socket with ``code``; the session ends."""

    def drop(self) -> None:
        """The peer stopped reading: let go of it at once."""


@dataclass(eq=False, slots=True)
class Subscription:
    gen_id: str
    thread_id: str | None
    viewer: Viewer[Any]  # of WS (texts) or WS_FRAMES (bytes)
    conn: Connection  # what the viewer parks on
    task: asyncio.Task[None] | None = None


class SocketConnection(Connection):
    """The socket as the process's ticker sees it: told when a ping is due, the socket
    stalled or the process drains (SIGTERM)."""

    __slots__ = ("on_wake",)

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any] | None,
                 now: float, on_wake: Callable[[], None]):
        super().__init__(loop, task, now, "websocket")
        self.on_wake = on_wake

    def wake(self) -> None:
        super().wake()
        self.on_wake()


class Session:
    """One accepted socket, from its first message to its close.

    ``task``: the task that reads the socket (api.ws_asgi.run_asgi), which the ticker cancels
    when a send stalls; None for a taken-over socket, which reads by callbacks.
    """

    __slots__ = ("state", "wire", "tenant", "grants", "subs", "loop", "conn", "ended")

    def __init__(self, state: AppState, tenant: str | None, grants: set[str] | None,
                 task: asyncio.Task[Any] | None):
        self.state = state
        self.wire: Wire | None = None
        self.tenant = tenant  # who creates and cancels (None: not authenticated yet)
        self.grants = grants  # generation and thread ids stream tokens gave this socket
        self.subs: dict[str, Subscription] = {}
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.conn = SocketConnection(loop, task, loop.time(), self._woken)
        self.ended = False

    def opened(self, wire: Wire) -> None:
        self.wire = wire
        self.state.hub.connections.open.add(self.conn)

    async def handle(self, raw: str | None) -> None:
        """One client message: what it asks is done, or an ``error`` message says why not.
        Raises (a GONE error) only if the socket is gone."""
        try:
            parsed = proto.parse(raw, self.state.settings.max_body_bytes)
        except proto.MessageError as exc:
            await self.send(proto.error(exc.code, exc.message, exc.ref))
            return
        try:
            await self._handle(parsed)
        except TokenRelayError as exc:
            await self.send(proto.error(exc.code, exc.message, parsed.ref))
        except RedisError as exc:
            logger.warning("websocket: redis unavailable: %s", exc)
            await self.send(proto.error("redis_unavailable", "storage is unavailable",
                                        parsed.ref))
        except GONE:
            raise
        except Exception:  # a bug: said as an error message; the socket stays open
            logger.exception("websocket: %s failed", type(parsed).__name__)
            await self.send(proto.error("internal_error", "internal error", parsed.ref))

    async def _handle(self, msg: proto.ClientMessage) -> None:
        if isinstance(msg, proto.Subscribe):
            await self._subscribe(msg.target, msg.after, msg.ref)
        elif isinstance(msg, proto.Unsubscribe):
            await self._unsubscribe(msg.target, msg.ref)
        elif isinstance(msg, proto.Create):
            await self._create(msg)
        elif isinstance(msg, proto.Cancel):
            outcome = await generations.cancel(self.state, self._creator(), msg.generation_id)
            await self.send(proto.reply("cancel_accepted", msg.ref,
                                        generation_id=msg.generation_id, outcome=outcome))
        elif isinstance(msg, proto.Auth):
            await self._auth(msg)
        else:
            await self.send(proto.reply("pong", msg.ref))

    # --- messages ----------------------------------------------------------------------

    def _creator(self) -> str:
        if self.tenant is None:
            raise Unauthorized("authenticate first: an auth message with an api_key "
                               "(stream tokens only read)")
        return self.tenant

    def _reader(self, some_id: str) -> Principal:
        """Who reads ``some_id`` (a generation or a thread): a token's grant or the tenant."""
        if self.grants and some_id in self.grants:
            return Principal(None, some_id)
        if self.tenant is None:
            raise Unauthorized("authenticate first: an auth message with an api_key or token")
        return Principal(self.tenant)

    async def _auth(self, msg: proto.Auth) -> None:
        if msg.token is not None:
            granted = self.state.tokens.verify(msg.token)
            if granted is None:
                raise Unauthorized("invalid or expired stream token")
            self.grants = {*(self.grants or ()), granted}
            await self.send(proto.reply("authenticated", msg.ref, scope=granted))
            return
        keys = self.state.tenants_by_key
        tenant = keys.get(msg.api_key or "") if keys else DEFAULT_TENANT
        if tenant is None:
            raise Unauthorized("invalid API key")
        self.tenant = tenant
        await self.send(proto.reply("authenticated", msg.ref, scope="tenant"))

    async def _subscribe(self, target: proto.Target, after: ev.StreamId | None,
                         ref: proto.Ref, *, owner_known: bool = False) -> None:
        thread_id = target.thread_id
        if thread_id is not None:
            found = await threads.active_generation(self.state, self._reader(thread_id),
                                                    thread_id, after)
            if found is None:  # no answer is being written (HTTP: 204)
                await self.send(proto.reply("subscribed", ref, thread_id=thread_id,
                                            generation_id=None))
                return
            gen_id, owner_known = found[1], True
        else:
            assert target.generation_id is not None
            gen_id = target.generation_id
        who = None if owner_known else self._reader(gen_id)
        old = self.subs.pop(gen_id, None)
        if old is not None:  # subscribing again (a new `after`): the new one replaces it
            await self._end(old)
        if len(self.subs) >= self.state.settings.ws_max_subscriptions:
            raise _too_many(self.state)
        hub = self.state.hub
        channel = await hub.join(gen_id)
        try:
            if channel.owner is None:
                raise generations.missing(self.state, gen_id)  # 410 once expired, else 404
            if who is not None and not who.may_read(gen_id, channel.owner):
                raise NotFound("no such generation")
            conn = Connection(self.loop, None, self.loop.time(), gen_id)
            view: View[Any] = WS_FRAMES if self._wire().frames else WS
            sub = Subscription(gen_id, thread_id, Viewer(hub, gen_id, after, view, channel),
                               conn)
            self.subs[gen_id] = sub
        except BaseException:
            hub.leave(channel)
            raise
        fields: dict[str, Any] = {"generation_id": gen_id}
        if thread_id is not None:
            fields["thread_id"] = thread_id
        await self.send(proto.reply("subscribed", ref, **fields))
        sub.task = asyncio.create_task(self._pump(sub), name=f"tr-ws-{gen_id}")

    async def _unsubscribe(self, target: proto.Target, ref: proto.Ref) -> None:
        found = [sub for sub in self.subs.values()
                 if sub.gen_id == target.generation_id or (
                     target.thread_id is not None and sub.thread_id == target.thread_id)]
        if not found:
            raise NotFound("not subscribed to it", code="not_subscribed")
        for sub in found:
            self.subs.pop(sub.gen_id, None)
            await self._end(sub)
            await self.send(proto.reply("unsubscribed", ref, generation_id=sub.gen_id))

    async def _create(self, msg: proto.Create) -> None:
        tenant = self._creator()
        if msg.subscribe and len(self.subs) >= self.state.settings.ws_max_subscriptions:
            raise _too_many(self.state)
        if isinstance(msg.request, GenerationCreate):
            created = await generations.create(self.state, tenant, msg.request, None)
            fields = created.model_dump()
        else:
            assert msg.thread_id is not None
            created = await threads.post_message(self.state, tenant, msg.thread_id, msg.request)
            fields = created.model_dump()
        fields["generation_id"] = fields.pop("id")
        await self.send(proto.reply("created", msg.ref, **fields))
        if msg.subscribe:
            await self._subscribe(proto.Target(generation_id=created.id), None, msg.ref,
                                  owner_known=True)

    # --- subscriptions -----------------------------------------------------------------

    async def _pump(self, sub: Subscription) -> None:
        """Send the subscription's events until its terminal one (then it ends by itself)."""
        viewer, wire = sub.viewer, self._wire()
        try:
            while (batch := await viewer.next(sub.conn)) is not None:
                if not batch:
                    continue
                if isinstance(batch, bytes):
                    await wire.send_frames(batch)
                else:
                    await wire.send_texts(batch)
        except GONE:
            return  # the socket is gone: its end releases everything
        except (RedisError, KeyError, ValueError) as exc:  # the stream could not be read
            logger.warning("websocket: generation_id=%s failed: %s", sub.gen_id, exc)
            with contextlib.suppress(*GONE):
                await self.send(proto.error("redis_unavailable", "storage is unavailable; "
                                            "subscribe again with after", None,
                                            generation_id=sub.gen_id))
        finally:
            if self.subs.get(sub.gen_id) is sub:
                del self.subs[sub.gen_id]
            await viewer.aclose()

    async def _end(self, sub: Subscription) -> None:
        task = sub.task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await sub.viewer.aclose()

    async def end(self) -> None:
        """The socket is gone or closing: every subscription leaves the hub (called once)."""
        self.ended = True
        self.state.hub.connections.open.discard(self.conn)
        subs, self.subs = list(self.subs.values()), {}
        for sub in subs:
            if sub.task is not None:
                sub.task.cancel()
        for sub in subs:
            await self._end(sub)

    # --- sending -----------------------------------------------------------------------

    def _wire(self) -> Wire:
        assert self.wire is not None, "the session is not open"
        return self.wire

    async def send(self, text: str) -> None:
        await self._wire().send_texts((text,))

    def _woken(self) -> None:
        """The ticker's news: a ping is due, the socket stalled, or the process is leaving."""
        conn, wire = self.conn, self.wire
        if wire is None or self.ended:
            return
        if conn.stalled:
            wire.drop()
        elif conn.draining:
            wire.close(*proto.DRAIN)
        elif conn.ping_due and not conn.disconnected:
            wire.ping()


def _too_many(state: AppState) -> TokenRelayError:
    limit = state.settings.ws_max_subscriptions
    return TooManyRequests(f"at most {limit} subscriptions per socket; unsubscribe first",
                           code="too_many_subscriptions")
