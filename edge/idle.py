"""Idle-only contribution, BOINC-like: the node runs jobs only on what its owner is not using.

`Preferences` come from the node's config (`"idle": {...}` in node.json) and are checked key by
key. `Monitor` reads the machine (CPU used by processes other than this node and its job
workers, memory, battery, seconds since the last keyboard/mouse input where the platform
tells). `IdleGate` turns readings into a `Decision` — run or not, why, and what to offer in
heartbeats — with hysteresis: the owner becoming active stops jobs at the next reading; they
run again only once the owner has been idle for `idle_time_to_run_s`. It also enforces
`cpu_cap_percent` by duty-cycling the running jobs (stop/continue), as BOINC does.

The readings (`Monitor`, `InputIdle`, `Sample`) live in edge/idle_monitor.py and are
re-exported here; psutil is imported by `Monitor` only, so the policy itself needs no platform
module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from edge.idle_monitor import InputIdle, Monitor, Sample, parse_interrupts

__all__ = [
    "THROTTLE_PERIOD_S",
    "Decision",
    "Hours",
    "IdleGate",
    "InputIdle",
    "Monitor",
    "Preferences",
    "PreferencesError",
    "Sample",
    "parse_interrupts",
]

THROTTLE_PERIOD_S = 1.0  # one run/stop cycle of the CPU cap


class PreferencesError(ValueError):
    """A preference in the node's config is wrong; the message names the key."""


@dataclass(frozen=True)
class Hours:
    """A daily window of local time, "HH:MM-HH:MM"; an end before the start wraps midnight."""

    start: int  # minutes after midnight
    end: int
    text: str

    @classmethod
    def parse(cls, text: object, key: str = "hours") -> Hours:
        problem = f'{key} must be "HH:MM-HH:MM" (e.g. "22:00-07:00") or null, got {text!r}'
        if not isinstance(text, str) or text.count("-") != 1:
            raise PreferencesError(problem)
        ends = []
        for part in text.split("-"):
            hh, sep, mm = part.strip().partition(":")
            if not (sep and hh.isdigit() and mm.isdigit() and len(mm) == 2):
                raise PreferencesError(problem)
            minute = int(hh) * 60 + int(mm)
            if int(mm) > 59 or minute > 24 * 60:
                raise PreferencesError(problem)
            ends.append(minute)
        if ends[0] == 24 * 60:
            raise PreferencesError(problem.replace(" or null", ", starting before 24:00,"))
        if ends[0] == ends[1]:
            raise PreferencesError(f"{key} {text!r} is an empty window; use null to run any time")
        return cls(ends[0], ends[1], text.strip())

    def contains(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end  # wraps midnight


def _number(key: str, value: object, lo: float, hi: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise PreferencesError(f"{key} must be {what}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Preferences:
    run_if_user_active: bool = False  # False: run only while the owner is idle
    idle_time_to_run_s: float = 60.0  # idle this long before jobs (re)start
    user_cpu_busy_percent: float | None = 25.0  # others' CPU (% of machine) = owner active
    cpu_cap_percent: float = 100.0  # share of wall time jobs may run (duty cycle)
    max_cores: int | None = None  # cores offered at most (None: all)
    ram_fraction_busy: float = 0.5  # share of RAM offered while the owner is active
    ram_fraction_idle: float = 0.9  # ... and while idle
    gpu_only_when_idle: bool = True
    hours: Hours | None = None  # None: any time of day
    run_on_battery: bool = False

    @classmethod
    def from_dict(cls, data: object, where: str = "idle") -> Preferences:
        """Preferences from the config file's object; errors name the key, e.g.
        `idle.cpu_cap_percent must be a number from 1 to 100, got 150`."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise PreferencesError(f"{where} must be an object of preferences, got {data!r}")
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                raise PreferencesError(
                    f"{where}.{key} is not a preference; known: {', '.join(known)}"
                )
        out: dict[str, Any] = {}
        for key, value in data.items():
            name = f"{where}.{key}"
            if key in ("run_if_user_active", "gpu_only_when_idle", "run_on_battery"):
                if not isinstance(value, bool):
                    raise PreferencesError(f"{name} must be true or false, got {value!r}")
                out[key] = value
            elif key == "idle_time_to_run_s":
                out[key] = _number(name, value, 0, 86400, "a number of seconds from 0 to 86400")
            elif key == "user_cpu_busy_percent":
                out[key] = (
                    None if value is None else _number(name, value, 1, 100, "from 1 to 100 or null")
                )
            elif key == "cpu_cap_percent":
                out[key] = _number(name, value, 1, 100, "a number from 1 to 100")
            elif key == "max_cores":
                if value is not None and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 1
                ):
                    raise PreferencesError(
                        f"{name} must be a whole number ≥ 1 or null, got {value!r}"
                    )
                out[key] = value
            elif key in ("ram_fraction_busy", "ram_fraction_idle"):
                out[key] = _number(name, value, 0, 1, "a fraction from 0 to 1 (0.5 is half)")
            elif key == "hours":
                out[key] = None if value is None else Hours.parse(value, name)
        return cls(**out)

    @classmethod
    def permissive(cls) -> Preferences:
        """Run always, on everything: what a node without idle preferences offers."""
        return cls(True, 0.0, None, 100.0, None, 1.0, 1.0, False, None, True)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["hours"] = self.hours.text if self.hours else None
        return data

    def usable_cores(self, cores: int) -> int:
        return max(1, min(cores, self.max_cores or cores))


@dataclass(frozen=True)
class Decision:
    run: bool
    why: str
    offer: dict[str, Any]  # {"cpu", "memory_mb", "gpu", "load"} for heartbeats
    user_active: bool
    # While jobs may not run: in how many seconds they may at the earliest (the owner staying
    # away, the hours' window opening); None when no one can tell (on battery).
    resume_in_s: float | None = None


class IdleGate:
    """The node's `gate` hook: `gate() -> (allowed, why)`, called every loop step. When it
    turns False the session suspends its running jobs, when True again it resumes them. With
    an `executor` (suspend/resume/active) and `cpu_cap_percent` < 100, each call also stops
    and continues the running jobs so they run that share of each second."""

    def __init__(
        self,
        prefs: Preferences,
        monitor: Monitor,
        executor: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.prefs = prefs
        self.monitor = monitor
        self.executor = executor
        self.clock = clock
        self.decision: Decision | None = None
        self._last_active: float | None = None  # monotonic time the owner was last seen busy

    def __call__(self) -> tuple[bool, str]:
        decision = self.decide()
        if decision.run:
            self.throttle(time.monotonic())
        return decision.run, decision.why

    def decide(self) -> Decision:
        self.decision = self.judge(self.monitor.sample(), self.clock())
        return self.decision

    def resume_in_s(self) -> float | None:
        """While jobs may not run: the soonest they may, in seconds (see Decision)."""
        decision = self.decision
        return None if decision is None or decision.run else decision.resume_in_s

    def offer(self) -> dict[str, Any]:
        """What to advertise now (the heartbeat's `resources`)."""
        return dict((self.decision or self.decide()).offer)

    def judge(self, s: Sample, now_wall: float) -> Decision:
        """The policy, for one reading `s` at wall-clock time `now_wall`."""
        p = self.prefs
        cpu_busy = (
            p.user_cpu_busy_percent is not None
            and s.window_s > 0
            and s.user_cpu_percent > p.user_cpu_busy_percent
        )
        if cpu_busy:
            self._last_active = s.at
        idle_for = math.inf if self._last_active is None else s.at - self._last_active
        if s.input_idle_s is not None:
            idle_for = min(idle_for, s.input_idle_s)
        active = cpu_busy or idle_for < p.idle_time_to_run_s
        measuring = p.user_cpu_busy_percent is not None and s.window_s == 0

        why = ""
        resume: float | None = max(0.0, p.idle_time_to_run_s - max(0.0, idle_for))
        local = time.localtime(now_wall)
        minute = local.tm_hour * 60 + local.tm_min
        if p.hours is not None and not p.hours.contains(minute):
            why = f"outside the hours {p.hours.text} set in the preferences"
            resume = max(0.0, ((p.hours.start - minute) % (24 * 60)) * 60.0 - local.tm_sec)
        elif s.on_battery and not p.run_on_battery:
            level = f" ({s.battery_percent:.0f}%)" if s.battery_percent is not None else ""
            why = f"on battery{level}: the preferences say not to run on battery"
            resume = None  # until it is plugged in: no one can tell when
        elif not p.run_if_user_active and measuring:
            why = "measuring the machine's load"
        elif not p.run_if_user_active and cpu_busy:
            why = (
                f"the owner is using the machine: other processes use "
                f"{s.user_cpu_percent:.0f}% of the CPU (over {p.user_cpu_busy_percent:g}%)"
            )
        elif not p.run_if_user_active and active and idle_for == s.input_idle_s:
            why = (
                f"the owner used the keyboard or mouse {idle_for:.0f} s ago "
                f"(jobs run after {p.idle_time_to_run_s:g} s idle)"
            )
        elif not p.run_if_user_active and active:
            why = (
                f"waiting for the owner to be idle {p.idle_time_to_run_s:g} s "
                f"(idle {max(0.0, idle_for):.0f} s)"
            )
        if why:
            offer = {"cpu": 0, "memory_mb": 0, "gpu": 0, "load": round(s.load, 3)}
            return Decision(False, why, offer, active, resume)

        cpu = float(p.usable_cores(s.cores))
        if active:  # allowed while the owner works: offer only the cores they leave free
            cpu = min(cpu, max(0.0, s.cores * (1 - s.user_cpu_percent / 100)))
        share = p.ram_fraction_busy if active else p.ram_fraction_idle
        memory = max(0, min(int(s.memory_total_mb * share), s.memory_available_mb))
        gpu = 0 if active and p.gpu_only_when_idle else s.gpus
        offer = {"cpu": round(cpu, 2), "memory_mb": memory, "gpu": gpu, "load": round(s.load, 3)}
        why = (
            "the owner is active; the preferences allow running" if active else "the owner is idle"
        )
        if p.cpu_cap_percent < 100:
            why += f"; jobs capped at {p.cpu_cap_percent:g}% CPU"
        return Decision(True, why, offer, active)

    def throttle(self, now: float) -> None:
        """CPU cap as a duty cycle: jobs run the first cap% of each period, stop the rest."""
        ex = self.executor
        if ex is None or not hasattr(ex, "active"):  # needs active() and reasons (wasm3)
            return
        cap = self.prefs.cpu_cap_percent
        run = cap >= 100 or (now % THROTTLE_PERIOD_S) < THROTTLE_PERIOD_S * cap / 100
        for handle in ex.active():
            if run:
                ex.resume(handle, "throttle")
            else:
                ex.suspend(handle, "throttle")
