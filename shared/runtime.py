"""Process-wide tuning shared by the API and worker processes: the garbage collector.

A full collection (generation 2) walks every object the collector tracks, and the
event loop waits meanwhile. A worker or API process holds ~225,000 of them once its
imports are done (the SDKs' pydantic models above all), and the collector runs a full
pass each time the tracked heap has grown by a quarter: while a thousand generations
started, a worker paused 75-130 ms at a time, which was its delivery p99
(docs/benchmarks.md, "Full collections"). What exists when the process is ready
lives as long as the process; ``gc.freeze`` moves it to the permanent generation,
which collections skip.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect once, then exempt every object alive now from later collections."""
    gc.collect()
    gc.freeze()
