"""``tokenrelay``: api, worker, dev, chat, watch."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time

import httpx
from pydantic import ValidationError

DEFAULT_URL = "http://127.0.0.1:8000"


def _settings():  # type: ignore[no-untyped-def]
    from shared.settings import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        for err in exc.errors():
            name = "TOKENRELAY_" + str(err["loc"][0]).upper() if err["loc"] else "TOKENRELAY_*"
            print(f"configuration error: {name}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _settings()
    if not settings.redis_url:
        print("configuration error: TOKENRELAY_REDIS_URL is not set", file=sys.stderr)
        return 2
    _logging(settings.log_level)
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run

    settings = _settings()
    if not settings.redis_url:
        print("configuration error: TOKENRELAY_REDIS_URL is not set", file=sys.stderr)
        return 2
    _logging(settings.log_level)
    run(settings, args.concurrency)
    return 0


def _wait_healthy(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the API did not become ready at {url}")


def cmd_dev(args: argparse.Namespace) -> int:
    from tokenrelay_cli.redis_server import RedisServer

    env = dict(os.environ)
    redis = None
    if not env.get("TOKENRELAY_REDIS_URL"):
        redis = RedisServer().start()
        env["TOKENRELAY_REDIS_URL"] = redis.url
        print(f"private redis-server at {redis.url}", flush=True)
    me = [sys.executable, "-m", "tokenrelay_cli"]
    procs = [
        subprocess.Popen([*me, "api", "--host", args.host, "--port", str(args.port)], env=env),
        subprocess.Popen([*me, "worker"], env=env),
    ]
    url = f"http://{args.host}:{args.port}"
    try:
        _wait_healthy(url, procs)
        print(f"tokenrelay is running at {url}  (Ctrl-C stops it)", flush=True)
        print(f'try: tokenrelay chat "hello" --model fake:echo --url {url}', flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if redis is not None:
            redis.stop()


def cmd_chat(args: argparse.Namespace) -> int:
    from tokenrelay_cli.client import chat

    return chat(args.url, args.prompt, args.model, args.api_key)


def cmd_watch(args: argparse.Namespace) -> int:
    from tokenrelay_cli.client import watch

    return watch(args.url, args.id, args.after, args.api_key)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenrelay", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    api = sub.add_parser("api", help="run the HTTP API (uvicorn)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1)
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="run an arq worker")
    worker.add_argument("--concurrency", type=int, default=None)
    worker.set_defaults(func=cmd_worker)

    dev = sub.add_parser("dev", help="Redis (private if unset), API and one worker on this machine")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)
    dev.set_defaults(func=cmd_dev)

    for name, helptext in (("chat", "start a generation and print it"),
                           ("watch", "follow a generation")):
        c = sub.add_parser(name, help=helptext)
        if name == "chat":
            c.add_argument("prompt")
            c.add_argument("--model", default="fake:echo")
            c.set_defaults(func=cmd_chat)
        else:
            c.add_argument("id")
            c.add_argument("--after", default=None, help="resume after this event id")
            c.set_defaults(func=cmd_watch)
        c.add_argument("--url", default=os.environ.get("TOKENRELAY_URL", DEFAULT_URL))
        c.add_argument("--api-key", default=os.environ.get("TOKENRELAY_API_KEY"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
