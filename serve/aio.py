"""asyncio helpers shared by the server's parts."""

from __future__ import annotations

import asyncio
from typing import Awaitable


async def set_within(event: asyncio.Event, seconds: float | None) -> bool:
    """Whether ``event`` is set within ``seconds`` (None: however long it takes)."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
        return True
    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        return False


async def done_before(work: Awaitable[object], event: asyncio.Event) -> bool:
    """Run ``work`` to its end (True), unless ``event`` is set first: then it is cancelled (False).
    Its errors are raised."""
    task = asyncio.ensure_future(work)
    interrupted = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, interrupted}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled itself
        task.cancel()
        raise
    finally:
        interrupted.cancel()
    if not task.done():
        task.cancel()
        return False
    task.result()
    return True
