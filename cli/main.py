"""The ``tokenrelay`` command: api, worker, dev, chat, watch, threads."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from tokenrelay import __version__
from tokenrelay.cli.client import DEFAULT_URL
from tokenrelay.cli.ports import bind_problem

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
    if (problem := bind_problem(args.host, args.port)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    _logging(settings)
    from tokenrelay.api.protocol import KEEP_ALIVE_S, GuardedHttpToolsProtocol
    from tokenrelay.api.ws_transport import TakeoverProtocol

    uvicorn.run(
        "tokenrelay.api.app:create_app",
        factory=True,
        http=GuardedHttpToolsProtocol,  # bounds on request heads and slow requests
        # /v1/ws: uvicorn's websockets-sansio protocol for the handshake, then the socket
        # taken over (a few KiB per idle socket instead of ~22, pre-framed writes), and no
        # per-message compression: deflating is work per socket and per message, where the
        # hub frames each message once per process.
        ws=TakeoverProtocol,
        ws_per_message_deflate=False,
        timeout_keep_alive=KEEP_ALIVE_S,
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


def cmd_dev(args: argparse.Namespace) -> int:
    from tokenrelay.cli.dev import run

    return run(args.host, args.port, args.data_dir)


def cmd_chat(args: argparse.Namespace) -> int:
    from tokenrelay.cli import threads
    from tokenrelay.cli.client import Session, chat

    prompt = args.prompt
    body = threads.message_body("", args.model, args.max_tokens, args.if_busy)
    if prompt is None and sys.stdin.isatty():
        session = Session(args.url, args.api_key, sys.stdout, sys.stderr, sys.stdin)
        return threads.Interactive(session, body).run(args.thread, args.system)
    if args.system is not None:
        args.parser.error("--system starts a new thread: give no PROMPT (interactive session)")
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read().rstrip()
        if not prompt:
            args.parser.error("the prompt read from stdin is empty")
    if args.thread is not None:
        session = Session(args.url, args.api_key, sys.stdout, sys.stderr, sys.stdin)
        return threads.chat_thread(session, args.thread, {**body, "content": prompt})
    return chat(args.url, prompt, args.model, args.api_key, max_tokens=args.max_tokens)


def cmd_threads(args: argparse.Namespace) -> int:
    from tokenrelay.cli.client import Session
    from tokenrelay.cli.threads import list_threads

    session = Session(args.url, args.api_key, sys.stdout, sys.stderr, sys.stdin)
    return list_threads(session, args.limit, args.json)


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
        "chat", help="start a generation and print it as it streams; chat in a thread",
        description="Start a generation and print its text as it streams. With --thread ID "
                    "the prompt is the thread's next message, answered with its history. "
                    "With no PROMPT and stdin a terminal: an interactive session on a new "
                    "thread (or --thread ID).",
        epilog=CLIENT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    chat.add_argument("prompt", nargs="?", default=None,
                      help="the prompt; '-' (or none, with stdin not a terminal) reads it "
                           "from stdin; none on a terminal: an interactive session")
    chat.add_argument("--thread", default=None, metavar="ID",
                      help="continue this thread (thr_...): the prompt is its next message")
    chat.add_argument("--system", default=None,
                      help="system prompt of the new thread an interactive session starts")
    chat.add_argument("--if-busy", default="enqueue", choices=("enqueue", "reject", "interrupt"),
                      help="thread messages, while another answer of the thread is being "
                           "written: run after it, refuse, or cancel it (default: enqueue)")
    chat.add_argument("--model", default=None,
                      help="provider:name, e.g. fake:lorem or openai:gpt-4o-mini "
                           "(default: the server's TOKENRELAY_DEFAULT_MODEL)")
    chat.add_argument("--max-tokens", type=int, default=None,
                      help="longest answer, in tokens (default: the model's)")
    chat.set_defaults(func=cmd_chat, parser=chat)

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

    threads = sub.add_parser(
        "threads", help="list your threads, newest activity first",
        description="List your threads (conversations), newest activity first: id, title, "
                    "last activity and number of messages. Continue one with "
                    "`tokenrelay chat --thread ID`.")
    threads.add_argument("--limit", type=int, default=20,
                         help="how many to list, 1 to 100 (default: 20)")
    threads.add_argument("--json", action="store_true",
                         help="print the API's JSON page instead of a table")
    threads.set_defaults(func=cmd_threads)

    for c in (chat, watch, threads):
        c.add_argument("--url", default=os.environ.get("TOKENRELAY_URL", DEFAULT_URL),
                       help="the API (default: $TOKENRELAY_URL or %(default)s)")
        c.add_argument("--api-key", default=os.environ.get("TOKENRELAY_API_KEY"),
                       help="default: $TOKENRELAY_API_KEY")


DESCRIPTION = """\
tokenrelay: a streaming backend for LLM apps. Generations run on workers and stream
through Redis, so a client that drops resumes where it stopped and anyone can watch live.

Start with `tokenrelay dev` (everything on this machine), then `tokenrelay chat "hello"`.
Settings are environment variables (TOKENRELAY_*; see the README).
"""


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help, unless the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenrelay", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    server = _DefaultsHelp
    api = sub.add_parser(
        "api", help="run the HTTP API (uvicorn)", formatter_class=server,
        description="Run the HTTP API. Needs TOKENRELAY_REDIS_URL; any number of API "
                    "processes can serve one Redis.")
    api.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (0.0.0.0: every interface)")
    api.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    api.add_argument("--workers", type=int, default=1,
                     help="uvicorn worker processes sharing the port")
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser(
        "worker", help="run an arq worker", formatter_class=server,
        description="Run a worker: it takes generations from the queue, calls the model and "
                    "streams the answer into Redis. Needs TOKENRELAY_REDIS_URL.")
    worker.add_argument("--concurrency", type=int, default=None,
                        help="generations this worker runs at once "
                             "(default: $TOKENRELAY_WORKER_CONCURRENCY, else 100)")
    worker.set_defaults(func=cmd_worker)

    dev = sub.add_parser(
        "dev", help="Redis (private if unset), API and one worker on this machine",
        formatter_class=server,
        description="Run everything on this machine: a private redis-server (unless "
                    "TOKENRELAY_REDIS_URL is set), the API and one worker. Ctrl-C or SIGTERM "
                    "stops all of them. Without --data-dir the data is gone when dev stops.")
    dev.add_argument("--host", default="127.0.0.1", help="address the API listens on")
    dev.add_argument("--port", type=int, default=8000, help="TCP port the API listens on")
    dev.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                     help="keep the private Redis's data (AOF) in DIR, so generations "
                          "survive a restart (default: a temporary directory, removed on exit)")
    dev.set_defaults(func=cmd_dev)

    _client_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
