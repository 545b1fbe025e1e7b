"""Long-running asyncio tasks that must not die quietly: the ledger writer's and the MQTT
bridge's. A leaf of the hub, importing nothing of it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any


async def supervise(
    body: Callable[[], Coroutine[Any, Any, None]], died: Callable[[Exception], None]
) -> None:
    """Run body until it returns; each time it dies of an exception, call died(error) (in the
    except block: it logs and counts) and run body again. A body that dies again at once is
    restarted after a pause (up to 5 s), not spun on. The writer's task and the bridge's."""
    quick_failures = 0
    while True:
        started = time.monotonic()
        try:
            await body()
            return
        except Exception as e:
            died(e)
        quick_failures = quick_failures + 1 if time.monotonic() - started < 1 else 1
        if quick_failures > 1:
            await asyncio.sleep(min(0.1 * 2 ** (quick_failures - 2), 5.0))
