"""Error rendering (api.errors, api.openai_errors): one shape per protocol, chosen by path,
whether the router, a route or a middleware answers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, Request
from redis.exceptions import ConnectionError as RedisConnectionError

from tokenrelay.api.errors import add_exception_handlers
from tokenrelay.api.middleware import BodyLimit
from tokenrelay.api.openai_errors import OpenAIError, add_openai_errors
from tokenrelay.shared.errors import TooManyRequests, Unauthorized


def make_app() -> FastAPI:
    """A bare app wired as the real one: native routes, two OpenAI routes, a body limit."""
    app = FastAPI()
    errors = add_exception_handlers(app)
    add_openai_errors(app, errors)
    app.add_middleware(BodyLimit, limit=100, errors=errors)

    @app.post("/v1/generations")
    async def native(request: Request) -> dict[str, str]:
        raise TooManyRequests("slow down", retry_after=2)

    @app.get("/v1/generations/{gen_id}")
    async def status(gen_id: int) -> dict[str, str]:
        raise Unauthorized("who are you")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, str]:
        kind = (await request.body()).decode()
        if kind == "auth":
            raise Unauthorized("missing or invalid API key")
        if kind == "redis":
            raise RedisConnectionError("gone")
        raise OpenAIError(400, "invalid_value", "bad 'n'", param="n",
                          headers={"x-should-retry": "false"})

    @app.get("/v1/models/{model_id}")
    async def model(model_id: int) -> dict[str, str]:
        return {"id": str(model_id)}

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


def openai_error(response: httpx.Response) -> dict[str, object]:
    error: dict[str, object] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


async def test_native_paths_keep_the_native_shape(client: httpx.AsyncClient) -> None:
    """Domain errors, the router's 404/405 and 422 answer {"error": {"code", "message"}}."""
    cases = [
        (await client.post("/v1/generations"), 429, "rate_limited"),
        (await client.get("/v1/generations/7"), 401, "unauthorized"),
        (await client.get("/v1/nothing"), 404, "not_found"),
        (await client.delete("/v1/generations"), 405, "method_not_allowed"),
        (await client.get("/v1/generations/x"), 422, "validation_error"),
        (await client.post("/v1/generations", content=b"x" * 101), 413, "payload_too_large"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"code", "message"}
        assert response.json()["error"]["code"] == code
    assert cases[0][0].headers["Retry-After"] == "2"


async def test_openai_paths_answer_in_openai_shape(client: httpx.AsyncClient) -> None:
    """On OpenAI paths every failure, the router's and the body limit's too, is OpenAI-shaped."""
    facade = await client.post("/v1/chat/completions", content=b"n")
    assert facade.status_code == 400 and facade.headers["x-should-retry"] == "false"
    assert openai_error(facade) == {"message": "bad 'n'", "type": "invalid_request_error",
                                    "param": "n", "code": "invalid_value"}

    auth = await client.post("/v1/chat/completions", content=b"auth")
    assert auth.status_code == 401
    assert openai_error(auth)["type"] == "authentication_error"

    storage = await client.post("/v1/chat/completions", content=b"redis")
    assert storage.status_code == 503 and storage.headers["Retry-After"] == "2"
    assert openai_error(storage)["type"] == "server_error"

    wrong_method = await client.get("/v1/chat/completions")
    assert wrong_method.status_code == 405
    assert openai_error(wrong_method)["code"] == "method_not_allowed"

    too_big = await client.post("/v1/chat/completions", content=b"x" * 101)
    assert too_big.status_code == 413
    assert openai_error(too_big)["code"] == "payload_too_large"

    invalid = await client.get("/v1/models/x")  # OpenAI never answers 422
    assert invalid.status_code == 400
    assert openai_error(invalid)["code"] == "validation_error"
