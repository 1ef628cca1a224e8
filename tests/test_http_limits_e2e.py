"""A bare ``tokenrelay api`` bounds what a client can hold open: request heads in bytes
and time, bodies in time, idle sockets (raw sockets against a real API process)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.stack import Stack

pytestmark = pytest.mark.slow  # starts real processes

HEAD_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack(apis=1, workers=0, env={
        "TOKENRELAY_REQUEST_HEAD_TIMEOUT_S": str(HEAD_TIMEOUT_S),
        "TOKENRELAY_REQUEST_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "TOKENRELAY_REQUEST_HEAD_MAX_BYTES": "8192"})
    yield s
    s.stop()


def _connect(stack: Stack) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", stack.ports[0]), timeout=10)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bytes, float]:
    """What the server sent before closing, and when it closed (fails if it did not)."""
    started = time.monotonic()
    received = b""
    sock.settimeout(seconds)
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        raise AssertionError(f"still open after {seconds} s; got {received!r}") from None
    except ConnectionResetError:
        pass
    return received, time.monotonic() - started


def test_a_huge_unfinished_head_is_refused(stack: Stack) -> None:
    with _connect(stack) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000)
        received, _ = _closed_within(sock, 5)
    assert received.startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"])
def test_a_silent_or_slow_head_is_closed(stack: Stack, sent: bytes) -> None:
    with _connect(stack) as sock:
        sock.sendall(sent)
        received, after = _closed_within(sock, HEAD_TIMEOUT_S + 5)
    assert received.startswith(b"HTTP/1.1 408 ")
    assert after < HEAD_TIMEOUT_S + 2


def test_a_slow_body_is_closed(stack: Stack) -> None:
    with _connect(stack) as sock:
        sock.sendall(b"POST /v1/generations HTTP/1.1\r\nHost: x\r\n"
                     b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"mo")
        _, after = _closed_within(sock, BODY_TIMEOUT_S + 5)
    assert after < BODY_TIMEOUT_S + 2


def test_ordinary_requests_and_keep_alive_still_work(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        for _ in range(3):
            assert client.get("/healthz").status_code == 200
        big = client.post("/v1/generations", json={"model": "fake:echo", "prompt": "x" * 200_000})
        assert big.status_code != 431 and big.status_code < 500
