"""What the terminal clients draw on stderr: the console, the spinner while nothing has
arrived yet (only on a terminal) and the summary line at the end."""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner as RichSpinner
from rich.text import Text

if TYPE_CHECKING:
    from tokenrelay.cli.stream import Outcome


class Spinner:
    """A one-line spinner on stderr while nothing has been printed; silent unless a terminal."""

    def __init__(self, console: Console):
        self.console = console
        self.enabled = console.is_terminal and not console.is_dumb_terminal
        self.label = ""
        self._spinner = RichSpinner("dots", text=Text())
        self._live: Live | None = None

    def start(self, label: str) -> None:
        self.update(label)
        if not self.enabled or self._live is not None:
            return
        # Live draws from a thread of its own; stdout is the answer's, so leave it alone.
        self._live = Live(self._spinner, console=self.console, transient=True,
                          refresh_per_second=12.5, redirect_stdout=False, redirect_stderr=False)
        self._live.start(refresh=True)  # draw the first frame now, not a tick later

    def update(self, label: str) -> None:
        self.label = label
        self._spinner.update(text=Text(label))  # a Text: no markup in labels

    def stop(self) -> None:
        if self._live is None:
            return
        self._live.stop()
        self._live = None


def isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def make_console(stream: TextIO) -> Console:
    """The console for stderr: colour only on a terminal, none with NO_COLOR (rich's rules);
    never wraps or highlights, and takes no markup, so server text is printed as it is."""
    return Console(file=stream, highlight=False, soft_wrap=True, markup=False, emoji=False)


_OUTCOME_STYLE = {"completed": "bold green", "failed": "bold red", "cancelled": "bold yellow"}


def finish(outcome: Outcome, out: TextIO, err: Console) -> int:
    """End the answer's line, and print the summary line: outcome · details · id."""
    out.write("\n")
    out.flush()
    parts: list[str]
    if outcome.terminal == "done":
        head = "completed"
        parts = [str(outcome.data.get("finish_reason") or "?")]
        usage = outcome.data.get("usage") or {}
        if usage:
            parts.append(f"{usage.get('prompt_tokens', '?')} prompt + "
                         f"{usage.get('completion_tokens', '?')} completion tokens")
    elif outcome.terminal == "error":
        head = "failed"
        parts = [f"{outcome.data.get('code')}: {outcome.data.get('message')}"]
    else:
        head, parts = outcome.terminal, []
    if outcome.ttft_s is not None:
        parts.append(f"first token {outcome.ttft_s * 1000:.0f} ms")
    parts.append(str(outcome.gen_id))
    line = Text()
    line.append("[", style="dim")
    line.append(head, style=_OUTCOME_STYLE.get(head, "bold"))
    for part in parts:
        line.append(" · ", style="dim")
        line.append(part, style="dim" if part == parts[-1] else "")
    line.append("]", style="dim")
    err.print(line)
    return outcome.exit_code
