"""Stopping background tasks reliably."""

from __future__ import annotations

import asyncio

from tokenrelay.worker.tasks import stop_task


async def test_stop_task_ends_a_task_that_swallowed_a_cancel() -> None:
    """stop_task re-cancels a task that swallowed the first cancellation (as wait_for may on 3.11)."""
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            swallowed.set()  # lost, as inside redis-py's wait_for
        await asyncio.sleep(10)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task), 2)
    assert swallowed.is_set() and task.cancelled()
