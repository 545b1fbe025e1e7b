"""Idle-only contribution against the real machine: real CPU-burning processes stand in for the
owner, real wasm jobs in real worker processes are stopped and continued, psutil reads the
real battery (none here) and memory. The policy's corner cases (hours, battery, RAM shares)
are also checked on readings built as data, since this machine cannot be put on battery.

Timing: everything that waits polls until a deadline; bounds are generous because the
machine is shared, and CPU figures are compared only where other load can only help.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import wasm_jobs
from edge.executors.wasm3 import Wasm3Executor
from edge.gpu import Gpu, detect, parse_nvidia_smi_csv
from edge.idle import (
    Hours,
    IdleGate,
    InputIdle,
    Monitor,
    Preferences,
    PreferencesError,
    Sample,
    parse_interrupts,
)
from edge.resources import Offered

FIB = wasm_jobs.path("fib.wasm").read_bytes()
LOOP = wasm_jobs.path("loop.wasm").read_bytes()
# stops by itself after two minutes, so a crashed test run cannot leave it burning
BURN = "import time\nend = time.time() + 120\nwhile time.time() < end:\n    pass\n"
# a process that burns through a child, as a container's first process runs the job
NESTED = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {BURN!r}])\n"


def no_input() -> InputIdle:
    """No input source: these tests are about CPU use, whatever terminal runs them."""
    return InputIdle(devices=(), interrupts=None, xprintidle=False, ttys=False)


def until(check: Callable[[], Any], limit_s: float, what: str, step: float = 0.05) -> Any:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"not within {limit_s}s: {what}")


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def job(module: bytes, entry: str, args: list[str], timeout_s: float = 30) -> dict[str, Any]:
    return {"job_id": "t", "module": module, "entrypoint": entry, "args": args,
            "timeout_s": timeout_s, "memory_mb": 64}  # fmt: skip


def started(ex: Wasm3Executor, handle: Any) -> bool:
    """The worker has the job and is running it (its ready frame came)."""
    assert ex.poll(handle) is None, handle.outcome
    return handle.worker is not None and handle.started is not None


@pytest.fixture
def ex() -> Iterator[Wasm3Executor]:
    with Wasm3Executor(workers=1) as executor:
        yield executor


@pytest.fixture
def burners() -> Iterator[Callable[..., list[psutil.Process]]]:
    """Start n CPU burners that are not our children (started through a shell that exits),
    as the owner's programs are not the node's; they are killed at the end."""
    procs: list[psutil.Process] = []

    def start(n: int, code: str = BURN) -> list[psutil.Process]:
        for _ in range(n):
            out = subprocess.run(
                ["sh", "-c", '"$0" -c "$1" >/dev/null 2>&1 & echo $!', sys.executable, code],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            procs.append(psutil.Process(int(out.stdout)))
        return procs

    yield start
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in p.children(recursive=True):
                child.kill()
            p.kill()


# -- preferences ---------------------------------------------------------------------------


def test_preferences_from_the_config_file() -> None:
    prefs = Preferences.from_dict(
        {
            "run_if_user_active": False,
            "idle_time_to_run_s": 60,
            "user_cpu_busy_percent": 25,
            "cpu_cap_percent": 100,
            "max_cores": None,
            "ram_fraction_busy": 0.5,
            "ram_fraction_idle": 0.9,
            "gpu_only_when_idle": True,
            "hours": "22:00-07:00",
            "run_on_battery": False,
        }
    )
    assert prefs.idle_time_to_run_s == 60 and prefs.ram_fraction_idle == 0.9
    assert prefs.hours == Hours(22 * 60, 7 * 60, "22:00-07:00")
    assert prefs.to_dict()["hours"] == "22:00-07:00"
    assert Preferences.from_dict(None) == Preferences() == Preferences.from_dict({})
    assert Preferences.from_dict({"max_cores": 1}).usable_cores(8) == 1
    assert Preferences().usable_cores(8) == 8


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("run_if_user_active", "no", "true or false"),
        ("run_on_battery", 1, "true or false"),
        ("idle_time_to_run_s", -1, "seconds"),
        ("idle_time_to_run_s", float("nan"), "seconds"),
        ("user_cpu_busy_percent", 0, "1 to 100"),
        ("cpu_cap_percent", 150, "1 to 100"),
        ("cpu_cap_percent", True, "1 to 100"),
        ("max_cores", 0, "whole number"),
        ("max_cores", 1.5, "whole number"),
        ("ram_fraction_busy", 2, "fraction"),
        ("ram_fraction_idle", "90%", "fraction"),
        ("hours", "9-17", "HH:MM-HH:MM"),
        ("hours", "09:00-25:00", "HH:MM-HH:MM"),
        ("hours", "09:61-10:00", "HH:MM-HH:MM"),
        ("hours", "08:00-08:00", "empty window"),
        ("idle_seconds", 5, "not a preference"),
    ],
)
def test_a_bad_preference_is_named(key: str, value: object, says: str) -> None:
    with pytest.raises(PreferencesError) as e:
        Preferences.from_dict({key: value})
    assert f"idle.{key}" in str(e.value) and says in str(e.value), str(e.value)


def test_preferences_must_be_an_object() -> None:
    with pytest.raises(PreferencesError, match="idle must be an object"):
        Preferences.from_dict(["run_on_battery"])


def test_hours_window_with_and_without_midnight() -> None:
    day = Hours.parse("09:00-17:00")
    assert day.contains(9 * 60) and day.contains(17 * 60 - 1)
    assert not day.contains(17 * 60) and not day.contains(9 * 60 - 1)
    night = Hours.parse("22:00-06:30")
    assert night.contains(23 * 60) and night.contains(0) and night.contains(6 * 60 + 29)
    assert not night.contains(6 * 60 + 30) and not night.contains(12 * 60)
    assert not night.contains(22 * 60 - 1) and night.contains(22 * 60)
    whole = Hours.parse("00:00-24:00")
    assert all(whole.contains(m) for m in range(0, 24 * 60, 7))


# -- the policy on readings given as data ---------------------------------------------------


@pytest.fixture(scope="module")
def reading() -> Sample:
    """A real reading of this machine, the base the data cases below vary."""
    monitor = Monitor(gpus=0, input_idle=no_input(), interval_s=0.3)
    return until(lambda: monitor.sample().window_s > 0 and monitor.last, 5, "a CPU reading")


def test_hours_outside_the_window_suspend(reading: Sample) -> None:
    now = time.time()
    local = time.localtime(now)
    minute = local.tm_hour * 60 + local.tm_min
    start, end = (minute + 120) % 1440, (minute + 180) % 1440
    window = f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"
    prefs = Preferences.from_dict({"hours": window, "run_if_user_active": True})
    gate = IdleGate(prefs, Monitor(gpus=0, input_idle=no_input()))
    d = gate.judge(reading, now)
    assert not d.run and window in d.why
    assert d.offer == {"cpu": 0, "memory_mb": 0, "gpu": 0, "load": round(reading.load, 3)}
    assert gate.judge(reading, now + 150 * 60).run  # two and a half hours later: inside


def test_battery(reading: Sample) -> None:
    monitor = Monitor(gpus=0, input_idle=no_input())
    real = psutil.sensors_battery()
    s = monitor.sample()
    if real is None:  # a desktop (or this VM): nothing to hold us back
        assert s.on_battery is None and s.battery_percent is None
    else:
        assert s.on_battery == (not real.power_plugged)
    stay = IdleGate(Preferences.from_dict({"run_if_user_active": True}), monitor)
    go = IdleGate(Preferences.from_dict({"run_if_user_active": True, "run_on_battery": True}),
                  monitor)  # fmt: skip
    unplugged = dataclasses.replace(reading, on_battery=True, battery_percent=40.0)
    d = stay.judge(unplugged, time.time())
    assert not d.run and d.why.startswith("on battery (40%)")
    assert go.judge(unplugged, time.time()).run
    plugged = dataclasses.replace(reading, on_battery=False, battery_percent=40.0)
    assert stay.judge(plugged, time.time()).run


def test_hysteresis_and_offers_on_readings(reading: Sample) -> None:
    prefs = Preferences.from_dict(
        {
            "idle_time_to_run_s": 2,
            "user_cpu_busy_percent": 30,
            "max_cores": 1,
            "ram_fraction_busy": 0.25,
            "ram_fraction_idle": 0.75,
        }
    )
    gate = IdleGate(prefs, Monitor(gpus=0, input_idle=no_input()))
    base = dataclasses.replace(reading, at=1000.0, window_s=1.0, user_cpu_percent=5.0,
                               cores=4, memory_total_mb=1000, memory_available_mb=900,
                               gpus=1, on_battery=None)  # fmt: skip
    now = time.time()
    d = gate.judge(base, now)
    assert d.run and d.offer == {
        "cpu": 1.0,
        "memory_mb": 750,
        "gpu": 1,
        "load": round(base.load, 3),
    }
    busy = gate.judge(dataclasses.replace(base, at=1001.0, user_cpu_percent=80.0), now)
    assert not busy.run and "80% of the CPU (over 30%)" in busy.why and busy.offer["cpu"] == 0
    calm = dataclasses.replace(base, user_cpu_percent=3.0)
    waiting = gate.judge(dataclasses.replace(calm, at=1002.0), now)
    assert not waiting.run and "waiting for the owner to be idle 2 s" in waiting.why
    assert gate.judge(dataclasses.replace(calm, at=1003.1), now).run
    # keyboard use counts as activity where the platform tells
    typed = gate.judge(dataclasses.replace(calm, at=1010.0, input_idle_s=0.5), now)
    assert not typed.run and "keyboard or mouse" in typed.why
    # the first reading of a fresh monitor has no CPU figures yet
    fresh = IdleGate(prefs, gate.monitor).judge(dataclasses.replace(base, window_s=0.0), now)
    assert not fresh.run and "measuring" in fresh.why


def test_a_held_node_says_when_it_may_run_again(reading: Sample) -> None:
    """The gate's guess of the soonest jobs may run again, which the heartbeat carries and the
    hub names in a waiting job's reason: the idle time still to go, the hours' window opening,
    nothing on battery (no one can tell when it is plugged in)."""
    prefs = Preferences.from_dict({"idle_time_to_run_s": 60, "user_cpu_busy_percent": 30})
    gate = IdleGate(prefs, Monitor(gpus=0, input_idle=no_input()))
    calm = dataclasses.replace(reading, at=1000.0, window_s=1.0, user_cpu_percent=2.0,
                               on_battery=None)  # fmt: skip
    now = time.time()
    typed = gate.judge(dataclasses.replace(calm, input_idle_s=12.0), now)
    assert not typed.run and typed.resume_in_s == 48.0
    busy = gate.judge(dataclasses.replace(calm, at=1001.0, user_cpu_percent=90.0), now)
    assert not busy.run and busy.resume_in_s == 60.0  # at the earliest, once the load drops
    later = gate.judge(dataclasses.replace(calm, at=1031.0), now)
    assert not later.run and later.resume_in_s == 30.0
    assert gate.judge(dataclasses.replace(calm, at=1061.0), now).run
    gate.decision = later
    assert gate.resume_in_s() == 30.0
    unplugged = gate.judge(dataclasses.replace(calm, at=1100.0, on_battery=True), now)
    assert not unplugged.run and unplugged.resume_in_s is None
    local = time.localtime(now)
    start = (local.tm_hour * 60 + local.tm_min + 90) % (24 * 60)  # opens in 90 minutes
    hours = f"{start // 60:02d}:{start % 60:02d}-{(start + 60) // 60 % 24:02d}:{start % 60:02d}"
    night = IdleGate(Preferences.from_dict({"hours": hours}), gate.monitor)
    closed = night.judge(dataclasses.replace(calm, at=1200.0), now)
    assert not closed.run and 90 * 60 - 60 < closed.resume_in_s <= 90 * 60  # type: ignore[operator]


def test_allowed_while_active_offers_less(reading: Sample) -> None:
    prefs = Preferences.from_dict(
        {"run_if_user_active": True, "ram_fraction_busy": 0.25, "gpu_only_when_idle": True}
    )
    gate = IdleGate(prefs, Monitor(gpus=0, input_idle=no_input()))
    active = dataclasses.replace(reading, window_s=1.0, user_cpu_percent=50.0, cores=4,
                                 memory_total_mb=1000, memory_available_mb=100, gpus=2,
                                 on_battery=None)  # fmt: skip
    d = gate.judge(active, time.time())
    assert d.run and d.user_active
    # the owner's two cores are not offered, RAM is what is left, the GPU waits for idle
    assert d.offer["cpu"] == 2.0 and d.offer["memory_mb"] == 100 and d.offer["gpu"] == 0
    idle = gate.judge(dataclasses.replace(active, at=active.at + 99, user_cpu_percent=0.0,
                                          memory_available_mb=900), time.time())  # fmt: skip
    assert not idle.user_active and idle.offer["gpu"] == 2 and idle.offer["cpu"] == 4.0


# -- the real machine ---------------------------------------------------------------------


def test_a_cpu_burner_makes_the_owner_active_then_idle(burners: Any) -> None:
    prefs = Preferences.from_dict({"idle_time_to_run_s": 1, "user_cpu_busy_percent": 40})
    monitor = Monitor(gpus=0, input_idle=no_input(), interval_s=0.5)
    gate = IdleGate(prefs, monitor)
    procs = burners(2)  # the whole of a two-core machine
    ours = {c.pid for c in psutil.Process().children(recursive=True)}
    assert not ours & {p.pid for p in procs}, "the owner's programs are not the node's"

    def suspended() -> Any:
        allowed, why = gate()
        return not allowed and "other processes use" in why and gate.decision

    d = until(suspended, 30, "the gate sees the burners")
    assert d.offer["cpu"] == 0 and d.offer["memory_mb"] == 0 and d.user_active
    last_busy = monitor.last.at if monitor.last else 0.0
    for p in procs:
        p.kill()

    def allowed_again() -> Any:
        nonlocal last_busy
        allowed, _ = gate()
        s = monitor.last
        assert s is not None
        if s.user_cpu_percent > 40:
            last_busy = s.at
        return allowed and s

    first = until(allowed_again, 90, "the gate lets jobs run once the burners are gone")
    assert first.at - last_busy >= 1.0  # idle_time_to_run_s of calm first
    offer = gate.offer()
    assert offer["cpu"] == psutil.cpu_count() and offer["memory_mb"] > 0


def test_our_own_jobs_are_not_the_owner(ex: Wasm3Executor) -> None:
    monitor = Monitor(exclude=ex.job_pids, gpus=0, input_idle=no_input(), interval_s=0.5)
    handle = ex.submit(job(LOOP, "_start", [], timeout_s=60))
    until(lambda: started(ex, handle), 30, "the loop job runs")
    assert ex.job_pids() == [handle.pid]

    def ours_seen() -> bool:
        assert ex.poll(handle) is None
        s = monitor.sample()
        # the job burns a core; it shows in the machine's load, not in the owner's share
        return s.window_s > 0 and s.load * 100 - s.user_cpu_percent >= 20

    until(ours_seen, 30, "the job's CPU counted as ours")
    ex.cancel(handle)


def test_excluded_pids_and_their_children_are_ours(burners: Any) -> None:
    """What an executor names as its job (a container's first process) is ours, with all
    it started, although none of it is our child."""
    (top,) = burners(1, NESTED)
    until(lambda: top.children(), 20, "the nested burner starts")
    told = Monitor(exclude=lambda: [top.pid], gpus=0, input_idle=no_input(), interval_s=0.5)
    blind = Monitor(gpus=0, input_idle=no_input(), interval_s=0.5)

    def ours() -> bool:
        s = told.sample()
        return s.window_s > 0 and s.load * 100 - s.user_cpu_percent >= 20

    def owners() -> bool:
        s = blind.sample()
        return s.window_s > 0 and s.user_cpu_percent >= 20

    until(ours, 30, "the excluded burner counted as ours")
    until(owners, 30, "the same burner counted as the owner's when not excluded")


def test_suspend_stops_a_running_job_and_resume_finishes_it(ex: Wasm3Executor) -> None:
    submitted = time.monotonic()
    handle = ex.submit(job(FIB, "fib", ["36"]))  # ~1.3 s of CPU on an idle machine
    until(lambda: started(ex, handle), 30, "fib runs")
    time.sleep(0.2)
    assert ex.suspend(handle)
    proc = psutil.Process(handle.pid)
    until(lambda: proc.status() == psutil.STATUS_STOPPED, 10, "the worker is stopped")
    before, t0 = cpu_s(handle.pid), time.monotonic()
    while time.monotonic() - t0 < 1.0:
        assert ex.poll(handle) is None
        time.sleep(0.05)
    assert cpu_s(handle.pid) - before < 0.02  # stopped means no CPU at all
    assert ex.resume(handle)
    until(lambda: proc.status() != psutil.STATUS_STOPPED, 10, "the worker continues")
    out = until(lambda: ex.poll(handle), 60, "fib finishes")
    assert out["status"] == "completed" and out["returns"] == [14930352], out
    assert handle.paused_s >= 1.0
    # the paused second is not the job's time, so it is not billed either
    assert out["wall_ms"] <= (time.monotonic() - submitted - handle.paused_s) * 1000
    assert out["wall_ms"] + 50 >= out["cpu_ms"]


def test_the_timeout_does_not_run_while_suspended(ex: Wasm3Executor) -> None:
    handle = ex.submit(job(FIB, "fib", ["33"], timeout_s=3))  # ~0.35 s of CPU
    until(lambda: started(ex, handle), 30, "fib runs")
    ex.suspend(handle)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 4.0:  # longer than its whole timeout
        assert ex.poll(handle) is None, handle.outcome
        time.sleep(0.05)
    ex.resume(handle)
    out = until(lambda: ex.poll(handle), 60, "fib finishes")
    assert out["status"] == "completed" and out["returns"] == [3524578], out
    assert out["wall_ms"] < 3000
    # the deadline moved, it did not vanish: a job that never ends still times out
    spin = ex.submit(job(LOOP, "_start", [], timeout_s=1))
    until(lambda: started(ex, spin), 30, "the loop runs")
    ex.suspend(spin)
    time.sleep(1.5)
    assert ex.poll(spin) is None
    ex.resume(spin)
    out = until(lambda: ex.poll(spin), 30, "the loop times out")
    assert out["error"] == "timeout: job exceeded its 1s limit", out
    assert 1000 <= out["wall_ms"] < 5000, out  # its running time only


def test_a_suspended_queued_job_waits(ex: Wasm3Executor) -> None:
    first = ex.submit(job(LOOP, "_start", [], timeout_s=60))
    second = ex.submit(job(FIB, "fib", ["20"]))
    assert second.worker is None  # one worker, busy
    ex.suspend(second)
    ex.cancel(first)
    for _ in range(20):
        assert ex.poll(second) is None and second.worker is None
        time.sleep(0.02)
    ex.resume(second)
    out = until(lambda: ex.poll(second), 30, "the queued job runs once resumed")
    assert out["returns"] == [6765]


def test_reasons_stack(ex: Wasm3Executor) -> None:
    handle = ex.submit(job(LOOP, "_start", [], timeout_s=60))
    until(lambda: started(ex, handle), 30, "the loop runs")
    proc = psutil.Process(handle.pid)
    ex.suspend(handle, "idle")
    ex.suspend(handle, "throttle")
    ex.resume(handle, "throttle")  # the owner is still active: stays stopped
    time.sleep(0.1)
    assert proc.status() == psutil.STATUS_STOPPED
    ex.resume(handle, "idle")
    until(lambda: proc.status() != psutil.STATUS_STOPPED, 10, "it runs again")
    ex.cancel(handle)  # a stopped or running worker is killed the same
    assert ex.poll(handle)["status"] == "cancelled"


def test_cpu_cap_duty_cycles_the_running_job(ex: Wasm3Executor) -> None:
    prefs = Preferences.from_dict(
        {"run_if_user_active": True, "user_cpu_busy_percent": None, "cpu_cap_percent": 40}
    )
    gate = IdleGate(prefs, Monitor(exclude=ex.job_pids, gpus=0, input_idle=no_input()), ex)
    handle = ex.submit(job(LOOP, "_start", [], timeout_s=60))
    until(lambda: started(ex, handle), 30, "the loop runs")
    proc = psutil.Process(handle.pid)
    before, t0, stopped_seen = cpu_s(handle.pid), time.monotonic(), False
    while time.monotonic() - t0 < 4.0:
        allowed, why = gate()
        assert allowed and "capped at 40%" in why
        assert ex.poll(handle) is None
        stopped_seen = stopped_seen or proc.status() == psutil.STATUS_STOPPED
        time.sleep(0.005)
    share = (cpu_s(handle.pid) - before) / (time.monotonic() - t0)
    assert stopped_seen and share < 0.6, share  # ~0.4 of a core, less on a busy machine
    ex.cancel(handle)


def test_offered_follows_the_gate() -> None:
    plain = Offered()(False)  # no preferences: everything
    assert set(plain) == {"cpu", "memory_mb", "gpu", "load"}
    assert plain["cpu"] == psutil.cpu_count() and plain["memory_mb"] > 0 and plain["gpu"] == 0
    assert Offered(max_cpu=1, max_memory_mb=64)(True)["memory_mb"] == 64
    local = time.localtime()
    start = (local.tm_hour * 60 + local.tm_min + 120) % 1440
    window = f"{start // 60:02d}:{start % 60:02d}-{(start + 60) // 60 % 24:02d}:{start % 60:02d}"
    prefs = Preferences.from_dict({"hours": window})
    closed = Offered(gate=IdleGate(prefs, Monitor(gpus=0, input_idle=no_input())))(False)
    assert closed["cpu"] == 0 and closed["memory_mb"] == 0 and closed["gpu"] == 0


# -- input idle and GPUs --------------------------------------------------------------------


def test_input_idle_from_device_times(tmp_path: Path) -> None:
    probe = InputIdle(devices=[str(tmp_path / "event*")], interrupts=None, xprintidle=False,
                      ttys=False)  # fmt: skip
    assert probe.seconds() is None  # no device: the platform does not tell
    dev = tmp_path / "event0"
    dev.touch()
    old = time.time() - 300
    os.utime(dev, (old, old))
    assert 290 < (probe.seconds() or 0) < 400
    os.utime(dev)  # a key press
    assert (probe.seconds() or 99) < 5


# /proc/interrupts of a laptop with a PS/2 keyboard and touchpad (i8042 on IRQ 1 and 12)
INTERRUPTS = """\
            CPU0       CPU1       CPU2       CPU3
   0:         11          0          0          0  IR-IO-APIC    2-edge      timer
   1:          0       4821          0          0  IR-IO-APIC    1-edge      i8042
   8:          0          0          1          0  IR-IO-APIC    8-edge      rtc0
   9:          0        310          0          0  IR-IO-APIC    9-fasteoi   acpi
  12:          0          0          0      93210  IR-IO-APIC   12-edge      i8042
 120:          0          0          0          0  DMAR-MSI    0-edge      dmar0
 129:     104392          0          0          0  IR-PCI-MSI 327680-edge      xhci_hcd
 NMI:         41         39         40         38   Non-maskable interrupts
"""


def test_interrupt_counters_of_keyboard_and_mouse() -> None:
    assert parse_interrupts(INTERRUPTS) == 4821 + 93210
    with open("/proc/interrupts") as f:
        assert parse_interrupts(f.read()) >= 0  # this machine's own table parses


# Output of `nvidia-smi --query-gpu=index,name,uuid,memory.total,memory.used,utilization.gpu
# --format=csv`, in the shape the driver prints it (units after numbers, [N/A] when unknown).
SMI_TWO = """\
index, name, uuid, memory.total [MiB], memory.used [MiB], utilization.gpu [%]
0, NVIDIA GeForce RTX 3090, GPU-5a3c1e0b-8d1f-4c2a-9b6e-0f7d2c4a1b3e, 24576 MiB, 1234 MiB, 5 %
1, Tesla P100-PCIE-16GB, GPU-04b76a6c-da10-342f-e9f5-5f5684eacb86, 16280 MiB, [N/A], [Not Supported]
"""
SMI_NOUNITS = """\
index, name, memory.total [MiB], utilization.gpu [%]
0, NVIDIA H100 80GB HBM3, 81559, 0
"""


def test_nvidia_smi_parser() -> None:
    two = parse_nvidia_smi_csv(SMI_TWO)
    assert two[0] == Gpu(0, "NVIDIA GeForce RTX 3090", "GPU-5a3c1e0b-8d1f-4c2a-9b6e-0f7d2c4a1b3e",
                         24576, 1234, 5)  # fmt: skip
    assert two[1].name == "Tesla P100-PCIE-16GB" and two[1].memory_mb == 16280
    assert two[1].memory_used_mb is None and two[1].utilization_percent is None
    assert parse_nvidia_smi_csv(SMI_NOUNITS) == [Gpu(0, "NVIDIA H100 80GB HBM3", None, 81559,
                                                     None, 0)]  # fmt: skip
    failed = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
    assert parse_nvidia_smi_csv(failed) == [] and parse_nvidia_smi_csv("") == []


def test_gpu_detection_on_this_machine() -> None:
    """The real NVML binding (nvidia-ml-py, installed with deparrow[full]) against this
    machine's driver: its GPUs where it has some, none (and no error) where it has none."""
    import re

    import pynvml  # type: ignore[import-not-found]  # noqa: F401  # a declared dependency

    from edge.gpu import _from_nvml

    gpus = detect()
    assert isinstance(gpus, list) and all(isinstance(g, Gpu) for g in gpus)
    if not os.path.exists("/dev/nvidiactl"):
        assert _from_nvml() is None  # NVML's library is not here: the binding says so
        assert gpus == []  # no NVIDIA driver here: nothing offered, no error
    else:
        boards = [d for d in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", d)]
        assert len(gpus) == len(boards) and all(g.name for g in gpus)


def test_job_workers_run_at_the_lowest_cpu_priority() -> None:
    import psutil

    from edge.executors.wasm3 import Wasm3Executor

    with Wasm3Executor(workers=1) as ex:
        ex.prestart()
        pids = [w["pid"] for w in ex.stats()]
        assert pids
        assert all(psutil.Process(pid).nice() == 19 for pid in pids)
