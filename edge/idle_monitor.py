"""The machine readings behind the idle gate (edge/idle.py): `Monitor` samples CPU used by
processes other than this node and its job workers, memory, battery and the GPU count with
psutil; `InputIdle` tells the seconds since the last keyboard/mouse input, from every source
the platform has. Each reading is a `Sample`; what to do with it is `IdleGate`'s policy.

psutil is imported when a `Monitor` is made (or ttys are read), never at import.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One reading of the machine."""

    at: float  # time.monotonic() when read
    window_s: float  # how long the CPU figures cover; 0: no CPU reading yet
    user_cpu_percent: float  # CPU used by other processes than ours, % of the whole machine
    load: float  # CPU used by everything, 0..1 of the machine
    cores: int
    memory_total_mb: int
    memory_available_mb: int
    on_battery: bool | None  # None: no battery (a desktop) or unknown
    battery_percent: float | None
    input_idle_s: float | None  # None: the platform does not tell
    gpus: int


def parse_interrupts(text: str) -> int:
    """Sum of the /proc/interrupts counters of keyboard and mouse lines (i8042, "keyboard",
    "mouse", "touchpad"): a change means someone touched them."""
    total = 0
    for line in text.splitlines()[1:]:
        name = line.lower()
        if not any(w in name for w in ("i8042", "keyboard", "mouse", "touchpad")):
            continue
        for cell in line.split(":", 1)[-1].split():
            if not cell.isdigit():
                break
            total += int(cell)
    return total


class InputIdle:
    """Seconds since the last keyboard/mouse input, from every source the platform has: X11
    (`xprintidle`), the atime/mtime of input devices and of logged-in users' terminals (what
    `w` shows), and the keyboard/mouse interrupt counters. The smallest wins; None when no
    source exists (then CPU use alone tells whether the owner is active)."""

    def __init__(
        self,
        devices: Iterable[str] = ("/dev/input/event*", "/dev/input/mice", "/dev/input/mouse*"),
        interrupts: str | None = "/proc/interrupts",
        xprintidle: bool = True,
        ttys: bool = True,
    ) -> None:
        self.devices = list(devices)
        self.interrupts = interrupts
        self.xprintidle = shutil.which("xprintidle") if xprintidle else None
        self.ttys = ttys
        self._irq_count: int | None = None
        self._irq_changed = time.monotonic()

    def _paths(self) -> list[tuple[str, bool]]:
        """(path, whether its mtime counts): a terminal's mtime moves when a program writes
        to it, its atime only when someone types (what `w` reads)."""
        paths = [(p, True) for pattern in self.devices for p in glob.glob(pattern)]
        if self.ttys:
            import psutil

            for user in psutil.users():
                if user.terminal:
                    paths.append((os.path.join("/dev", user.terminal), False))
        return paths

    def seconds(self) -> float | None:
        now_wall, now = time.time(), time.monotonic()
        found: list[float] = []
        if self.xprintidle and os.environ.get("DISPLAY"):
            try:
                out = subprocess.run([self.xprintidle], capture_output=True, timeout=2, text=True)
                if out.returncode == 0 and out.stdout.strip().isdigit():
                    found.append(int(out.stdout) / 1000.0)
            except (OSError, subprocess.SubprocessError):
                pass
        for path, mtime_counts in self._paths():
            try:
                st = os.stat(path)
            except OSError:
                continue
            last = max(st.st_atime, st.st_mtime) if mtime_counts else st.st_atime
            found.append(max(0.0, now_wall - last))
        if self.interrupts:
            try:
                with open(self.interrupts) as f:
                    count = parse_interrupts(f.read())
            except OSError:
                count = 0
            if count:
                if self._irq_count is not None and count != self._irq_count:
                    self._irq_changed = now
                self._irq_count = count
                found.append(now - self._irq_changed)  # at least this long
        return min(found) if found else None


class Monitor:
    """Reads the machine with psutil, at most once per `interval_s` (CPU figures need a
    window). `exclude()` gives pids whose CPU is ours besides this process and its
    descendants (e.g. `executor.job_pids`): a job of ours is never mistaken for the owner."""

    def __init__(
        self,
        exclude: Callable[[], Iterable[int]] | None = None,
        interval_s: float = 1.0,
        input_idle: InputIdle | None = None,
        gpus: int | None = None,
    ) -> None:
        import psutil

        self.ps = psutil
        self.exclude = exclude or (lambda: ())
        self.interval_s = interval_s
        self.input_idle = input_idle if input_idle is not None else InputIdle()
        if gpus is None:
            from edge.gpu import detect

            gpus = len(detect())
        self.gpus = gpus
        self.cores = psutil.cpu_count() or 1
        self._mark = (time.monotonic(), *self._cpu_now())
        self.last: Sample | None = None

    def _cpu_now(self) -> tuple[float, float, float]:
        """(machine busy seconds, machine total seconds, our processes' seconds)."""
        t = self.ps.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
        total = busy + t.idle + getattr(t, "iowait", 0) + getattr(t, "steal", 0)
        me = self.ps.Process()
        procs = [me]
        with contextlib.suppress(self.ps.Error):
            procs += me.children(recursive=True)
        seen = {p.pid for p in procs}
        for pid in self.exclude():  # e.g. a container's first process: it and what it started
            if pid in seen:
                continue
            with contextlib.suppress(self.ps.Error):
                top = self.ps.Process(pid)
                for p in [top, *top.children(recursive=True)]:
                    if p.pid not in seen:
                        seen.add(p.pid)
                        procs.append(p)
        ours = 0.0
        for p in procs:
            try:
                c = p.cpu_times()
            except self.ps.Error:
                continue  # gone: its time went to its parent's children_* (if it is ours)
            # reaped children's time is in children_*: the sum stays continuous as they exit
            ours += c.user + c.system + c.children_user + c.children_system
        return busy, total, ours

    def sample(self) -> Sample:
        now = time.monotonic()
        window = now - self._mark[0]
        if self.last is not None and window < self.interval_s:
            return self.last
        cpu: tuple[float, float] | None = None
        if window >= min(self.interval_s, 0.25):
            busy, total, ours = self._cpu_now()
            d_total = total - self._mark[2]
            if d_total > 0:
                others = (busy - self._mark[1]) - (ours - self._mark[3])
                cpu = (
                    max(0.0, min(100.0, 100.0 * others / d_total)),
                    max(0.0, min(1.0, (busy - self._mark[1]) / d_total)),
                )
            self._mark = (now, busy, total, ours)
        vm = self.ps.virtual_memory()
        battery = self.ps.sensors_battery() if hasattr(self.ps, "sensors_battery") else None
        self.last = Sample(
            at=now,
            window_s=window if cpu else 0.0,
            user_cpu_percent=cpu[0] if cpu else 0.0,
            load=cpu[1] if cpu else 0.0,
            cores=self.cores,
            memory_total_mb=int(vm.total // (1 << 20)),
            memory_available_mb=int(vm.available // (1 << 20)),
            on_battery=None if battery is None else not battery.power_plugged,
            battery_percent=None if battery is None else float(battery.percent),
            input_idle_s=self.input_idle.seconds(),
            gpus=self.gpus,
        )
        return self.last
