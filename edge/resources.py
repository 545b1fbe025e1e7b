"""What this machine offers, read with psutil (CPython nodes only; boards pass their own)."""

from __future__ import annotations

import os
from typing import Any

from edge.idle import IdleGate, Monitor, Preferences


def machine() -> dict[str, Any]:
    """What enrollment tells the hub of this machine."""
    import platform

    import psutil

    return {
        "arch": platform.machine(),
        "cpu": float(os.cpu_count() or 1),
        "memory_mb": int(psutil.virtual_memory().total // (1024 * 1024)),
    }


class Offered:
    """Callable for the session: `offered(busy) -> {"cpu", "memory_mb", "gpu", "load"}`, what
    we offer right now, as the idle gate decides it (edge/idle.py): all usable cores, the
    preferences' share of RAM and the GPUs while the owner is idle; nothing while the node is
    suspended (owner active, outside the hours, on battery). Without a gate it offers
    everything (no idle preferences). `max_cpu` and `max_memory_mb` cap the numbers further."""

    def __init__(
        self,
        max_cpu: float | None = None,
        max_memory_mb: int | None = None,
        gate: IdleGate | None = None,
    ) -> None:
        self.max_cpu = max_cpu
        self.max_memory_mb = max_memory_mb
        self.gate = gate or IdleGate(Preferences.permissive(), Monitor(gpus=0))

    def __call__(self, busy: bool) -> dict[str, Any]:
        offer = self.gate.decide().offer  # the monitor reads at most once a second
        cpu, mem = float(offer["cpu"]), int(offer["memory_mb"])
        if self.max_cpu is not None:
            cpu = min(cpu, self.max_cpu)
        if self.max_memory_mb is not None:
            mem = min(mem, self.max_memory_mb)
        return {"cpu": cpu, "memory_mb": mem, "gpu": int(offer["gpu"]), "load": offer["load"]}
