"""``tokenrelay``: api, worker, dev, chat, watch."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import httpx
from pydantic import ValidationError

from tokenrelay.cli.client import DEFAULT_URL

if TYPE_CHECKING:
    from tokenrelay.shared.settings import Settings


def _settings() -> Settings:
    from tokenrelay.shared.settings import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        for err in exc.errors():
            name = "TOKENRELAY_" + str(err["loc"][0]).upper() if err["loc"] else "TOKENRELAY_*"
            print(f"configuration error: {name}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def _logging(settings: Settings) -> None:
    from tokenrelay.shared.logs import configure

    configure(settings.log_level, settings.log_format)


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _settings()
    if not settings.redis_url:
        print("configuration error: TOKENRELAY_REDIS_URL is not set", file=sys.stderr)
        return 2
    _logging(settings)
    uvicorn.run(
        "tokenrelay.api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        log_config=None,  # keep ours (shared.logs): request ids, JSON on demand
        timeout_graceful_shutdown=5,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from tokenrelay.worker.main import run

    settings = _settings()
    if not settings.redis_url:
        print("configuration error: TOKENRELAY_REDIS_URL is not set", file=sys.stderr)
        return 2
    _logging(settings)
    run(settings, args.concurrency)
    return 0


def _wait_healthy(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the API did not become ready at {url}")


def cmd_dev(args: argparse.Namespace) -> int:
    from tokenrelay.cli.redis_server import RedisServer

    env = dict(os.environ)
    redis = None
    if not env.get("TOKENRELAY_REDIS_URL"):
        redis = RedisServer().start()
        env["TOKENRELAY_REDIS_URL"] = redis.url
        print(f"private redis-server at {redis.url}", flush=True)
    me = [sys.executable, "-m", "tokenrelay"]
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
    from tokenrelay.cli.client import chat

    return chat(args.url, args.prompt, args.model, args.api_key, max_tokens=args.max_tokens)


def cmd_watch(args: argparse.Namespace) -> int:
    from tokenrelay.cli.client import watch

    return watch(args.url, args.id, args.after, args.api_key, token=args.token)


CLIENT_EPILOG = """\
The answer's text goes to stdout; the spinner, notices and the summary line to stderr.
A dropped connection is resumed silently (Last-Event-ID).

exit codes:
  0    the generation completed
  1    the generation failed (an error event)
  2    the server refused the request (unknown id or model, bad key, ...) or bad arguments
  3    the generation was cancelled
  4    the server could not be reached, or stayed unavailable
  130  interrupted with Ctrl-C (chat asks whether to cancel or leave it running)
"""


def _client_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    chat = sub.add_parser(
        "chat", help="start a generation and print it as it streams",
        description="Start a generation and print its text as it streams.",
        epilog=CLIENT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    chat.add_argument("prompt")
    chat.add_argument("--model", default="fake:echo", help="provider:name (default: fake:echo)")
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.set_defaults(func=cmd_chat)

    watch = sub.add_parser(
        "watch", help="follow a generation, from the start or after an event id",
        description="Follow a generation: replay its text so far, then follow it live. "
                    "ID may also be a share link (http://HOST/?view=ID&token=T).",
        epilog=CLIENT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    watch.add_argument("id", help="generation id, or a share link")
    watch.add_argument("--after", default=None, metavar="EVENT_ID",
                       help="print only what comes after this event id")
    watch.add_argument("--token", default=None,
                       help="read-only stream token (from a share link) instead of an API key")
    watch.set_defaults(func=cmd_watch)

    for c in (chat, watch):
        c.add_argument("--url", default=os.environ.get("TOKENRELAY_URL", DEFAULT_URL),
                       help="the API (default: $TOKENRELAY_URL or %(default)s)")
        c.add_argument("--api-key", default=os.environ.get("TOKENRELAY_API_KEY"),
                       help="default: $TOKENRELAY_API_KEY")


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

    _client_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
