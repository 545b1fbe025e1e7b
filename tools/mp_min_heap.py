#!/usr/bin/env python3
"""Finds the smallest MicroPython heap (`micropython -X heapsize=<n>k`) in which a node
(edge/mp_main.py) completes a heartbeat + job cycle against a real hub, by bisection.

    python tools/mp_min_heap.py [--mode frozen,source|frozen|source|mpy|all]
                                [--low KIB] [--high KIB] [--jobs fib,sieve] [--confirm N]
                                [--micropython PATH] [--engine dpwasm3|wasm3-run]

It runs the DEparrow firmware for the unix port (`make firmware-unix`: firmware/build.sh
--unix, MicroPython with the node frozen in and dpwasm3 compiled in), or --micropython.
One Mosquitto and one hub (deparrow/localnet.py) serve every trial; the node is enrolled once.
A trial starts the node in the heap under test and passes when it comes online (hello and
heartbeats reach the hub), runs each job to a settled, correct result and then stops cleanly
(--exit-after). The modes, all on the same binary:
  frozen  `micropython -m edge.mp_main`: the node's bytecode frozen into the binary (a board's
          flash), none of it in the heap;
  source  `micropython edge/mp_main.py`: every module of the node (edge/, umqtt.simple,
          wasm3_exec) from its .py file, compiled at import (the compiler needs heap too);
  mpy     the same modules precompiled by the firmware's own mpy-cross and loaded into the
          heap, as stock firmware with the node installed by mip runs them.
--engine: jobs in dpwasm3, in the node's process (the default, as the firmware's node runs
them), or in wasm3-run processes (--runner). The smallest passing size is then run
--confirm more times, stepping up 4 KiB whenever one fails, since a heap near its limit also
depends on fragmentation.

Prints one line of JSON: {"micropython_min_heap_kb": the frozen figure (else mpy, else
source), "frozen"/"source"/"mpy": {"min_heap_kib", "trials": [...]}, "micropython": ...,
"jobs": [...]}. Needs what the MicroPython tests need: the firmware, mosquitto,
tools/fetch-umqtt.py (source mode) and tools/build-wasm3-runner.sh (--engine wasm3-run).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
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
    "firmware/wasm3_exec.py",
]  # fmt: skip
MODES = ("frozen", "source", "mpy")


QUIET = False


class Failed(Exception):
    pass


def need(path: Path, how: str) -> Path:
    if not path.exists():
        raise SystemExit(f"mp_min_heap: {path} is missing: {how}")
    return path


def firmware() -> str:
    """The firmware's binary for the current sources (firmware/build.sh --unix --print-path)."""
    done = subprocess.run(
        [str(ROOT / "firmware" / "build.sh"), "--unix", "--print-path"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    path = Path(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else None
    if done.returncode or path is None or not path.is_file():
        raise SystemExit(
            "mp_min_heap: the DEparrow firmware for the unix port is not built for these "
            f"sources{f' ({path})' if path else ''}: run `make firmware-unix`"
            f"{chr(10) + done.stderr.strip() if done.stderr.strip() else ''}"
        )
    return str(path)


def build_mpy(out: Path, lib: Path, cross: Path) -> Path:
    """The node's modules as .mpy files, laid out as the package paths (wasm3_exec and
    umqtt.simple at the top)."""
    if not cross.is_file():
        raise SystemExit(f"mp_min_heap: no mpy-cross beside the firmware ({cross})")
    pairs = []
    for m in NODE_MODULES:
        target = m.removeprefix("firmware/").replace(".py", ".mpy")
        pairs.append((ROOT / m, out / target))
    pairs.append((lib / "umqtt" / "simple.py", out / "umqtt/simple.mpy"))
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [str(cross), "-o", str(dst), str(src)], capture_output=True, text=True
        )  # fmt: skip
        if done.returncode:
            raise SystemExit(f"mp_min_heap: mpy-cross {src}: {done.stderr.strip()}")
    return out


class Bench:
    def __init__(
        self, work: Path, jobs: list[str], micropython: str, modes: list[str], engine: str
    ) -> None:
        self.work = work
        # `micropython -m` looks in the current directory first: not in this repository,
        # or the frozen and mpy trials would import the .py files
        os.chdir(work)
        self.jobs = jobs
        self.micropython = micropython
        self.runner = None
        if engine == "wasm3-run":
            self.runner = need(
                ROOT / "edge/native/bin/wasm3-run", "run tools/build-wasm3-runner.sh"
            )
        self.lib = ROOT / "edge/native/lib"
        if "source" in modes or "mpy" in modes:
            need(self.lib / "umqtt/simple.py", "run tools/fetch-umqtt.py")
        if "mpy" in modes:
            self.mpy = build_mpy(work / "mpy", self.lib, Path(micropython).parent / "mpy-cross")
        self.broker = ChildBroker("mosquitto", "127.0.0.1", free_port(), work / "mosquitto")
        self.broker.start()
        self.hub = LocalHub(work / "hub", mqtt_url=self.broker.url, heartbeat_s=0.5)
        _, self.owner = self.hub.user("owner")
        _, self.alice = self.hub.user("alice")
        self.data = work / "node"
        token = self.owner.enrollment_token()["token"]
        self.node_id = enroll(self.hub.url, token, "mp-heap", self.data / "node.json")["node_id"]
        self.n = 0

    def command(self, kib: int, mode: str) -> tuple[list[str], dict[str, str]]:
        cmd = [self.micropython, "-X", f"heapsize={kib}k"]
        if mode == "frozen":  # nothing but the binary
            cmd += ["-m", "edge.mp_main"]
            env = {"MICROPYPATH": ".frozen"}
        elif mode == "mpy":
            cmd += ["-m", "edge.mp_main"]
            env = {"MICROPYPATH": str(self.mpy)}  # no .frozen: the .mpy files, in the heap
        else:  # mp_main puts the repository and edge/native/lib first; wasm3_exec's source
            cmd += [str(ROOT / "edge/mp_main.py")]
            env = {"MICROPYPATH": str(ROOT / "firmware")}
        cmd += ["--data-dir", str(self.data), "--memory-mb", "256"]
        if self.runner is not None:
            cmd += ["--runner", str(self.runner)]
        cmd += ["--exit-after", str(len(self.jobs)), "-v"]
        return cmd, env

    def close(self) -> None:
        self.hub.stop()
        self.broker.stop()

    def node_state(self) -> dict[str, Any]:
        return next(n for n in self.owner.nodes() if n["id"] == self.node_id)

    def trial(self, kib: int, mode: str) -> dict[str, Any]:
        self.n += 1
        cmd, env = self.command(kib, mode)
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
    ap.add_argument(
        "--mode", default="frozen,source",
        help="frozen, source and/or mpy, comma-separated, or all (default frozen,source)",
    )  # fmt: skip
    ap.add_argument("--low", type=int, default=16, help="KiB (default 16)")
    ap.add_argument("--high", type=int, default=512, help="KiB (default 512)")
    ap.add_argument("--jobs", default="fib", help="example jobs each trial runs (default fib)")
    ap.add_argument("--confirm", type=int, default=2, help="extra runs of the minimum")
    ap.add_argument("--micropython", help="this binary, not the firmware (make firmware-unix)")
    ap.add_argument("--engine", choices=["dpwasm3", "wasm3-run"], default="dpwasm3",
                    help="where jobs run (default dpwasm3, in the node's process)")  # fmt: skip
    ap.add_argument("--json", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    global QUIET
    QUIET = args.json
    jobs = [j for j in args.jobs.split(",") if j]
    unknown = [j for j in jobs if j not in EXPECTED]
    if unknown or not jobs:
        ap.error(f"--jobs takes names from {', '.join(EXPECTED)}, not {unknown or args.jobs!r}")
    modes = list(MODES) if args.mode == "all" else [m for m in args.mode.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--mode takes {', '.join(MODES)} (comma-separated) or all, not {args.mode!r}")
    if not 1 <= args.low < args.high:
        ap.error("need 1 <= --low < --high")
    micropython = args.micropython or firmware()
    version = subprocess.run(
        [micropython, "-c", "import sys; print(sys.version)"], capture_output=True, text=True
    ).stdout.strip()  # fmt: skip
    out: dict[str, Any] = {"micropython": version, "binary": micropython, "jobs": jobs,
                           "engine": args.engine}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mp-heap-") as tmp:
        bench = Bench(Path(tmp), jobs, micropython, modes, args.engine)
        try:
            for mode in modes:
                out[mode] = bisect(bench, mode, args.low, args.high, args.confirm)
        finally:
            bench.close()
    # The headline: the node as the firmware runs it, frozen (else precompiled, else source).
    for mode in ("frozen", "mpy", "source"):
        if mode in out and out[mode].get("min_heap_kib"):
            out["micropython_min_heap_kb"] = out[mode]["min_heap_kib"]
            out["headline_mode"] = mode
            break
    print(json.dumps(out))
    return 0 if all(out[m].get("min_heap_kib") for m in modes) else 1


if __name__ == "__main__":
    sys.exit(main())
