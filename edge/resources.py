"""What this machine offers, read with psutil (CPython nodes only; boards pass their own)."""

from __future__ import annotations

import os
import platform
from typing import Any

import psutil


def machine() -> dict[str, Any]:
    return {
        "arch": platform.machine(),
        "cpu": float(os.cpu_count() or 1),
        "memory_mb": int(psutil.virtual_memory().total // (1024 * 1024)),
    }


class Offered:
    """Callable for the session: the CPU and RAM we offer right now.

    Offers one CPU-equivalent per idle core (a job runs on one core), and the RAM that is
    available; issue-4 preferences (idle-only, caps, hours) will shape these numbers.
    """

    def __init__(self, max_cpu: float | None = None, max_memory_mb: int | None = None) -> None:
        self.max_cpu = max_cpu
        self.max_memory_mb = max_memory_mb
        psutil.cpu_percent(None)  # prime the counter so the first reading is meaningful

    def __call__(self, busy: bool) -> dict[str, Any]:
        cores = float(os.cpu_count() or 1)
        load = psutil.cpu_percent(None) / 100.0
        mem = int(psutil.virtual_memory().available // (1024 * 1024))
        cpu = cores if self.max_cpu is None else min(cores, self.max_cpu)
        if self.max_memory_mb is not None:
            mem = min(mem, self.max_memory_mb)
        return {"cpu": cpu, "memory_mb": mem, "gpu": 0, "load": round(load, 3)}
