"""A tokenrelay worker process under cProfile, for the benchmarks' ``--profile``."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.stack import Process  # noqa: E402

# cProfile on CPU time, not wall time: on a shared machine a function's wall time counts
# whatever else ran while it was descheduled.
PROFILED = """
import cProfile, runpy, sys, time
sys.argv = ["tokenrelay", "worker"]
profile = cProfile.Profile(time.process_time)
profile.enable()
try:
    runpy.run_module("tokenrelay", run_name="__main__")
finally:
    profile.disable()
    profile.dump_stats({out!r})
"""


class ProfiledWorker(Process):
    """The worker as ``Stack`` starts it, under cProfile (stats written when it exits)."""

    def __init__(self, out: Path, env: dict[str, str]):
        self.name = "worker0"
        self.log = tempfile.NamedTemporaryFile(prefix="tr-worker-", suffix=".log", delete=False)
        self.popen = subprocess.Popen([sys.executable, "-c", PROFILED.format(out=str(out))],
                                      env=env, cwd=ROOT, stdout=self.log,
                                      stderr=subprocess.STDOUT)
