"""Responses API use cases behind the routes: create, read, stream, wait, cancel.

A response is a generation: ``resp_<hex>`` names ``gen_<hex>``, so any API process
serves any response from Redis alone. Its fixed fields ride on the generation's first
event, and everything else is folded from its events (:mod:`tokenrelay.api.response_events`),
so a JSON read, a stream from its start and a resume after any sequence number agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from fastapi import Request

from tokenrelay.api import generations, response_request
from tokenrelay.api.channel import Channel, Pushed, Viewer, events_after
from tokenrelay.api.deps import AppState
from tokenrelay.api.openai_errors import OpenAIError
from tokenrelay.api.openai_response import with_heartbeat
from tokenrelay.api.response_events import RESPONSES, ResponseState, after_sequence, step
from tokenrelay.api.sse import NEED, Connection, EventStreamResponse, Need
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys, streams
from tokenrelay.shared.errors import Conflict
from tokenrelay.shared.ids import is_generation_id, new_generation_id
from tokenrelay.shared.redis import awaited, text

# This endpoint, as an Idempotency-Key's request fingerprint names it.
ENDPOINT = "POST /v1/responses"
# How long a cancel waits for the generation's end before answering with what it has.
CANCEL_WAIT_S = 5.0
# Entries per XRANGE page when a response is folded straight from Redis.
PAGE = 500


def response_id(gen_id: str) -> str:
    return "resp_" + gen_id.removeprefix("gen_")


def generation_of(resp_id: str, param: str | None = None) -> str:
    """The generation a response id names; 404 (400 for a parameter) if malformed."""
    gen_id = "gen_" + resp_id.removeprefix("resp_")
    if not resp_id.startswith("resp_") or not is_generation_id(gen_id):
        raise not_found(resp_id, param)
    return gen_id


def not_found(resp_id: str, param: str | None = None) -> OpenAIError:
    if param is not None:  # OpenAI: an unknown previous_response_id is a bad request
        return OpenAIError(400, "previous_response_not_found",
                           f"Previous response with id '{resp_id}' not found.", param=param)
    return OpenAIError(404, "not_found", f"Response with id '{resp_id}' not found.")


async def read(state: AppState, tenant: str, resp_id: str,
               param: str | None = None) -> tuple[ResponseState, dict[str, str]]:
    """The response folded from Redis, and its generation's meta; 404 unless it is a
    response of ``tenant``'s (400 when it was named by the parameter ``param``)."""
    gen_id = generation_of(resp_id, param)
    raw = await awaited(state.redis.hgetall(keys.meta(gen_id)))
    meta = {text(k): text(v) for k, v in raw.items()}
    if meta.get("tenant") != tenant:
        raise not_found(resp_id, param)
    folded, after = ResponseState(), None
    while True:
        page = await streams.read_after(state.redis, gen_id, after, PAGE)
        for entry_id, fields in page:
            step(folded, ev.decode_entry(entry_id, fields))
        if folded.head is None or len(page) < PAGE:
            break
        after = text(page[-1][0])
    if folded.head is None:
        raise not_found(resp_id, param)  # a generation, but not one made as a response
    return folded, meta


async def create(state: AppState, tenant: str, request: response_request.ResponsesRequest,
                 idempotency_key: str | None) -> str:
    """Chain the request onto its previous response and queue its generation; its id."""
    model = response_request.resolve_model(request, state.settings)
    earlier: list[dict[str, Any]] = []
    if request.previous_response_id is not None:
        previous, meta = await read(state, tenant, request.previous_response_id,
                                    param="previous_response_id")
        if not previous.ended:
            raise OpenAIError(400, "previous_response_in_progress",
                              f"Previous response '{request.previous_response_id}' has not "
                              "ended yet; chain onto it once it has.",
                              param="previous_response_id")
        earlier = response_request.earlier_turns(previous, json.loads(meta["request"]))
    body = response_request.to_generation(request, model, earlier)
    gen_id = new_generation_id()
    head = response_request.head(request, response_id(gen_id), model, streams.now())
    created = await generations.create(state, tenant, body, idempotency_key, endpoint=ENDPOINT,
                                       gen_id=gen_id, first_event={"response": head})
    return created.id


class _AfterSequence:
    """A viewer's frames, less those numbered up to ``last`` (``starting_after``)."""

    __slots__ = ("viewer", "last")

    def __init__(self, viewer: Viewer[bytes], last: int | None):
        self.viewer = viewer
        self.last = last

    async def open(self) -> None:
        await self.viewer.open()

    async def next(self, conn: Connection) -> bytes | None:
        return self._skip(await self.viewer.next(conn))

    def poll(self, conn: Connection, pushed: Pushed) -> bytes | None | Need:
        chunk = self.viewer.poll(conn, pushed)
        return chunk if chunk is NEED else self._skip(chunk)

    async def fetch(self) -> bytes | None:
        return self._skip(await self.viewer.fetch())

    def _skip(self, chunk: bytes | None) -> bytes | None:
        if self.last is None or not chunk:
            return chunk
        chunk = after_sequence(chunk, self.last)
        if chunk:
            self.last = None  # past it: every later frame goes out as it is
        return chunk

    async def aclose(self) -> None:
        await self.viewer.aclose()


async def open_stream(state: AppState, tenant: str, gen_id: str,
                      starting_after: int | None) -> EventStreamResponse:
    """The stream of a response of ``tenant``'s (404 otherwise; 503 at the viewer limit).

    Authorised through the hub, as native streams are: the channel that loads the
    stream's tail also loads its owner, and holds its first event unless the stream is
    long, so a stream this process already serves costs Redis nothing more per viewer.
    """
    channel = await state.hub.join(gen_id)
    try:
        if channel.owner != tenant or not await _made_as_response(state, channel):
            raise not_found(response_id(gen_id))
        generations.ensure_viewer_capacity(state)
    except BaseException:
        state.hub.leave(channel)
        raise
    return event_stream(state, gen_id, starting_after, channel)


async def _made_as_response(state: AppState, channel: Channel) -> bool:
    """Whether the channel's generation was created by POST /v1/responses (its first
    event carries the response's fields)."""
    if channel.head_complete and channel.base == 0 and channel.events:
        first = channel.events[0]
    else:  # the channel holds a tail only: read the first event
        entries = await state.redis.xrange(keys.events(channel.gen_id), count=1)
        if not entries:
            return False
        first = ev.decode_entry(*entries[0])
    return first.type == ev.STATUS and isinstance(first.data.get("response"), dict)


def event_stream(state: AppState, gen_id: str, starting_after: int | None,
                 channel: Channel | None = None) -> EventStreamResponse:
    """The response's events from the first after ``starting_after``, live, to its end.

    The frames are the fold's from the stream's start (shared by this process's viewers);
    the ones a client has already seen are skipped here. ``channel``: the viewer's hub
    registration, when the caller has joined already.
    """
    viewer = Viewer(state.hub, gen_id, None, RESPONSES, channel)
    return EventStreamResponse(
        _AfterSequence(viewer, starting_after),
        state.hub.connections,
        # No `retry:`: the openai SDK does not reconnect by itself; its user resumes with
        # starting_after (also after the shutdown hint, a lone `retry:` line it ignores).
        preamble=b"",
        headers={"X-Generation-Id": gen_id},
        label=gen_id,
    )


async def follow(state: AppState, gen_id: str, *, request: Request | None = None,
                 wait_s: float | None = None) -> ResponseState | None:
    """The response folded from its events until its end (or after ``wait_s``: as it is);
    None if ``request``'s client left first."""
    folded = ResponseState()
    events = with_heartbeat(events_after(state.hub, gen_id, None), state.settings.heartbeat_s)
    with contextlib.suppress(TimeoutError):
        async with contextlib.aclosing(events), asyncio.timeout(wait_s):
            async for event in events:
                if event is None:
                    if request is not None and await request.is_disconnected():
                        return None  # it goes on; the client can read it by its id
                    continue
                step(folded, event)
                if event.terminal:
                    return folded
    if wait_s is None:
        raise OpenAIError(502, "stream_lost", f"the events of generation {gen_id} are no "
                          "longer available", type_="server_error")
    return folded


async def cancel(state: AppState, tenant: str, resp_id: str) -> dict[str, Any]:
    """Cancel a response (idempotent: an ended one is returned as it is), then answer with
    it once it has ended, or after CANCEL_WAIT_S as it is then."""
    folded, _ = await read(state, tenant, resp_id)
    if folded.ended:
        return folded.response()
    gen_id = generation_of(resp_id)
    with contextlib.suppress(Conflict):  # it ended meanwhile
        await generations.cancel(state, tenant, gen_id)
    after = await follow(state, gen_id, wait_s=CANCEL_WAIT_S)
    return (after or folded).response()
