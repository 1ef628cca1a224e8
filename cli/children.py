"""Child processes of ``tokenrelay dev``: each in a session of its own, ended with dev.

A terminal's Ctrl-C goes to its whole foreground process group. Children that
shared dev's group would all stop at once, in no order: the private Redis first,
while the worker still writes to it. In a session of their own only dev gets the
signal and stops them in order. ``PR_SET_PDEATHSIG`` (Linux) stops them too
should dev itself be killed with SIGKILL, so none is left behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import Any

_PR_SET_PDEATHSIG = 1


def _end_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM when the parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # no prctl: dev's own shutdown still stops the children


def own_session() -> dict[str, Any]:
    """``subprocess.Popen`` arguments for a child in its own session, ended with its parent."""
    if sys.platform.startswith("linux"):
        return {"start_new_session": True, "preexec_fn": _end_with_parent}
    return {"start_new_session": True}


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the child's process group (its own, see ``own_session``)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # it has just exited
