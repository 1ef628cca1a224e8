"""Redis plumbing: replies as text, scripts, Lua sets, backoff and retrying through an outage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared import events as ev
from tokenrelay.shared.redis import Backoff, Script, lua_set, retrying, text


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_server.url)
    yield r
    await r.aclose()


def test_text_decodes_bytes_and_passes_str() -> None:
    """Replies of a bytes client and of a decoding client read the same."""
    assert text(b"caf\xc3\xa9") == "café"
    assert text("café") == "café"
    assert text(7) == "7"


async def test_a_script_survives_the_server_forgetting_it(client: Redis) -> None:
    """A script runs, is cached by the server, and runs again after SCRIPT FLUSH."""
    script = Script("return {KEYS[1], ARGV[1]}")
    assert await script(client, ["k"], "v") == [b"k", b"v"]
    assert (await client.script_exists(script.sha)) == [True]
    assert await script(client, ["k2"], "v2") == [b"k2", b"v2"]
    await client.script_flush()
    assert await script(client, ["k3"], "v3") == [b"k3", b"v3"]


async def test_many_runs_a_script_per_call_in_order_even_after_a_flush(client: Redis) -> None:
    """One pipeline of calls answers in order, on a server that knows the script or not;
    an error of one call is raised."""
    script = Script("return {KEYS[1], ARGV[1]}")
    calls = [([f"k{i}"], [f"v{i}"]) for i in range(5)]
    expected = [[f"k{i}".encode(), f"v{i}".encode()] for i in range(5)]
    assert await script.many(client, calls) == expected  # never sent: EVAL for each
    assert await script.many(client, calls) == expected  # by SHA
    await client.script_flush()
    assert await script.many(client, calls) == expected
    assert await script.many(client, []) == []
    failing = Script("return redis.call('INCR', KEYS[1])")
    await client.set("text", "not a number")
    with pytest.raises(ResponseError):
        await failing.many(client, [(["n"], []), (["text"], [])])
    assert await client.get("n") == b"1"  # the other call ran


async def test_a_script_error_is_raised(client: Redis) -> None:
    """A failing script raises; it is not mistaken for a missing one."""
    script = Script("return redis.call('INCR', KEYS[1])")
    await client.set("not-a-number", "x")
    for _ in range(2):  # once by EVAL, once by EVALSHA
        with pytest.raises(ResponseError):
            await script(client, ["not-a-number"])


async def test_lua_set_holds_exactly_the_terminal_statuses(client: Redis) -> None:
    """The Lua set built from shared.events answers membership as the Python set does."""
    member = Script(f"local S = {lua_set(ev.TERMINAL_STATUSES)}\n"
                    "if S[ARGV[1]] then return 1 else return 0 end")
    for status in (*ev.TERMINAL_STATUSES, ev.QUEUED, ev.RUNNING, "Completed", ""):
        assert await member(client, [], status) == (status in ev.TERMINAL_STATUSES), status


async def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    """Delays double from the first up to the cap; a reset starts over."""
    backoff = Backoff(0.001, 0.004)
    delays = []
    for _ in range(4):
        delays.append(backoff.delay)
        await backoff.sleep()
    assert delays == [0.001, 0.002, 0.004, 0.004]
    backoff.reset()
    assert backoff.delay == 0.001


class Failing:
    """A call that raises ``error`` its first ``times`` calls, then answers "ok"."""

    def __init__(self, error: Exception, times: int = 1_000_000) -> None:
        self.error = error
        self.times = times
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.times:
            raise self.error
        return "ok"


async def test_retrying_rides_out_connection_errors() -> None:
    """A call that fails while Redis is away is repeated until it succeeds."""
    flaky = Failing(RedisConnectionError("down"), times=2)
    assert await retrying(flaky, "gen_x", within_s=5) == "ok"
    assert flaky.calls == 3


async def test_retrying_gives_up_after_its_window() -> None:
    """With no window the first outage error is raised; with one, the last after it."""
    down = Failing(RedisConnectionError("down"))
    with pytest.raises(RedisConnectionError):
        await retrying(down, "gen_x", within_s=0)
    assert down.calls == 1
    down = Failing(RedisConnectionError("down"))
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(retrying(down, "gen_x", within_s=0.2), 5)
    assert down.calls > 1


async def test_retrying_never_repeats_other_errors() -> None:
    """A script error is not an outage: it is raised at once."""
    broken = Failing(ResponseError("bad script"))
    with pytest.raises(ResponseError):
        await retrying(broken, "gen_x", within_s=5)
    assert broken.calls == 1
