"""The edge runtime's figures, each against its target, in one run.

    python bench/edge.py [--json] [--reps 20] [--skip-network]

- wasm3_job_overhead_ms: a trivial job (fib(1)) through a warm Wasm3Executor, minus the same
  call made directly with pywasm3 in this process (fresh runtime + load + call), medians of
  --reps runs each. Target <= 10 ms, aim <= 2.
- fib(30) and sieve(10,000,000) timings on wasm3 (the executor), wasmtime (its executor, when
  installed: `pip install .[full]`) and native C (gcc -O2 of the same programs), same run.
- cpython_rss_idle_mb: resident memory of an idle `edge-run` node process (enrolled with a
  real hub and its Mosquitto, heartbeating), and with its wasm3 workers (none until its first
  job: they start then and stay warm). Target <= 40, aim <= 20 (issue 20).
- cold_start_to_heartbeat_ms: from starting an enrolled `edge-run` to its first heartbeat
  reaching the hub: the time the hub records it at (the node's `last_seen`, read over REST;
  the hub's clock is this machine's); median of --starts starts. The node runs with the
  bytecode of edge/ compiled first, as a pip-installed node has it; the same starts with
  edge/'s bytecode removed (every module compiled at each start, as a checkout runs under
  PYTHONDONTWRITEBYTECODE=1) give cold_start_from_source_ms. Target <= 1000, aim <= 150.
  cold_start_cpu_ms: the CPU time (user + system) the node had used when the hub saw its
  hello, median of the same starts: on a loaded machine the wall-clock figure waits for the
  cores, this one much less, so it is the one to compare two versions by.
- node_imports: what the node imports on its way to the first heartbeat, from three more starts
  under `python -X importtime` (medians): the module count, the sum of the top-level imports' times
  and the top-level imports by cumulative time (a top-level import: one the node's own code
  made, with everything it pulled in below it; `site` is the interpreter's own start).
  Imports under -X importtime run slower than in a plain start: they rank the costs, they do
  not add up to the figure above.
- micropython_min_heap_kb: the smallest `micropython -X heapsize` in which the firmware's node
  (`make firmware-unix`: the node frozen in, jobs in dpwasm3) completes a heartbeat and a wasm
  job (fib) against a real hub (tools/mp_min_heap.py; the same binary running the .py sources
  is measured too, as micropython.source). Target <= 64 (issue 17).

Prints each figure with its target, and as its last line one JSON object. Exit status 1 when a
figure misses its target.
"""

from __future__ import annotations

import argparse
import compileall
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import wasm_jobs  # noqa: E402
from edge.executors.wasm3 import Wasm3Executor  # noqa: E402

FIB_N = 30
SIEVE_N = 10_000_000
TARGETS = {  # figure: (target, aim); lower is better
    "wasm3_job_overhead_ms": (10.0, 2.0),
    "cpython_rss_idle_mb": (40.0, 20.0),
    "cold_start_to_heartbeat_ms": (1000.0, 150.0),
    "micropython_min_heap_kb": (64.0, None),
}

NATIVE_FIB = r"""
#include <stdio.h>
#include <stdlib.h>
/* The same recursion as wasm-jobs/src/fib.wat: fib(n) = n < 2 ? n : fib(n-1) + fib(n-2). */
static long long fib(int n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }
int main(int argc, char **argv) { printf("%lld\n", fib(atoi(argv[1]))); return 0; }
"""


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def module(name: str) -> bytes:
    return wasm_jobs.path(wasm_jobs.manifest()[name]["module"]).read_bytes()


def job(name: str, entry: str, args: list[str], timeout_s: float = 120) -> dict[str, Any]:
    return {
        "job_id": name,
        "module": module(name),
        "entrypoint": entry,
        "args": args,
        "env": {},
        "stdin": b"",
        "timeout_s": timeout_s,
        "memory_mb": 64,
    }


# --- executors ----------------------------------------------------------------------------
def wasm3_overhead(reps: int) -> dict[str, Any]:
    import wasm3

    fib = module("fib")

    def direct() -> None:
        env = wasm3.Environment()
        rt = env.new_runtime(1 << 20)
        rt.load(env.parse_module(fib))
        assert rt.find_function("fib")(1) == 1

    direct_s: list[float] = []
    for _ in range(reps):
        t = time.perf_counter()
        direct()
        direct_s.append(time.perf_counter() - t)
    executor_s: list[float] = []
    with Wasm3Executor(workers=1) as ex:
        ex.prestart()
        trivial = job("fib", "fib", ["1"])
        ex.run(trivial)  # warm: the worker has imported everything
        for _ in range(reps):
            t = time.perf_counter()
            out = ex.run(trivial)
            executor_s.append(time.perf_counter() - t)
            assert out["returns"] == [1], out
    return {
        "direct_pywasm3_ms": median_ms(direct_s),
        "executor_ms": median_ms(executor_s),
        "wasm3_job_overhead_ms": round(median_ms(executor_s) - median_ms(direct_s), 3),
    }


def timed_runs(
    make: Callable[[], Any], run: Callable[[Any, dict[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    """fib(30) and sieve(N) on one executor: wall ms of each (the executor's own figure)."""
    figures: dict[str, Any] = {}
    with make() as ex:
        for label, spec, check in (
            ("fib30_ms", job("fib", "fib", [str(FIB_N)]), lambda o: o["returns"] == [832040]),
            (
                "sieve_ms",
                {**job("sieve", "_start", [str(SIEVE_N)]), "memory_mb": 64},
                lambda o: o["stdout"] == f"primes below {SIEVE_N}: 664579\n".encode(),
            ),
        ):
            run(ex, spec)  # warm-up
            t = time.perf_counter()
            out = run(ex, spec)
            elapsed = time.perf_counter() - t
            if out["status"] != "completed" or not check(out):
                raise RuntimeError(f"{label}: unexpected outcome {out}")
            figures[label] = round(elapsed * 1000, 1)
    return figures


def wasmtime_timings() -> dict[str, Any]:
    try:
        from edge.executors.wasmtime_exec import WasmtimeExecutor
    except ImportError as e:
        return {"skipped": f"wasmtime engine not installed ({e}); pip install '.[full]'"}
    return timed_runs(WasmtimeExecutor, lambda ex, spec: ex.run(spec))


def native_timings(tmp: Path) -> dict[str, Any]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return {"skipped": "no C compiler"}
    (tmp / "fib.c").write_text(NATIVE_FIB)
    src = ROOT / "wasm-jobs" / "src"
    fib, sieve = tmp / "fib", tmp / "sieve"
    subprocess.run([cc, "-O2", "-o", str(fib), str(tmp / "fib.c")], check=True)
    subprocess.run([cc, "-O2", "-I", str(src), "-o", str(sieve), str(src / "sieve.c")], check=True)
    figures: dict[str, Any] = {}
    for label, cmd, expect in (
        ("fib30_ms", [str(fib), str(FIB_N)], "832040\n"),
        ("sieve_ms", [str(sieve), str(SIEVE_N)], f"primes below {SIEVE_N}: 664579\n"),
    ):
        subprocess.run(cmd, check=True, capture_output=True)  # warm-up (page cache)
        t = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        figures[label] = round((time.perf_counter() - t) * 1000, 1)
        if out != expect:
            raise RuntimeError(f"native {label}: printed {out!r}, expected {expect!r}")
    return figures


# --- a node on a real hub -----------------------------------------------------------------
EDGE = ROOT / "edge"


def edge_bytecode(present: bool) -> None:
    """Compile edge/'s bytecode (as pip does on install), or remove it (a checkout run under
    PYTHONDONTWRITEBYTECODE=1 compiles every module at each start)."""
    if present:
        compileall.compile_dir(str(EDGE), quiet=1)
        return
    for pyc in EDGE.rglob("__pycache__/*.pyc"):
        pyc.unlink(missing_ok=True)


def parse_importtime(texts: list[str], top: int = 12) -> dict[str, Any]:
    """`python -X importtime` lines of a node's logs (one per start), each up to its "online"
    line (printed once its hello and first heartbeat went out): the module count, the sum of
    the top-level imports' cumulative times, and the `top` costliest top-level imports;
    medians over the starts (one start alone ranks whatever the machine did meanwhile)."""
    counts, sums = [], []
    roots: dict[str, list[tuple[int, int]]] = {}
    for text in texts:
        modules = 0
        total = 0
        for line in text.splitlines():
            if " online at " in line:
                break
            if not line.startswith("import time:") or "imported package" in line:
                continue
            self_us, cumulative_us, name = line.removeprefix("import time:").split("|")
            modules += 1
            if not name.startswith("  "):  # one space, then two more for each level down
                roots.setdefault(name.strip(), []).append((int(self_us), int(cumulative_us)))
                total += int(cumulative_us)
        counts.append(modules)
        sums.append(total)

    def ms(values: list[int]) -> float:
        return round(statistics.median(values) / 1000, 1)

    rows = [(name, ms([c for _, c in t]), ms([s for s, _ in t])) for name, t in roots.items()]
    rows.sort(key=lambda r: -r[1])
    return {
        "modules": int(statistics.median(counts)),
        "top_level_ms": ms(sums),
        "top": [{"module": n, "cumulative_ms": c, "self_ms": s} for n, c, s in rows[:top]],
    }


def node_figures(tmp: Path, starts: int) -> dict[str, Any]:
    import psutil

    from deparrow.localnet import LocalHub, Proc, wait_for

    hub = LocalHub(tmp / "hub", heartbeat_s=0.5)
    try:
        _, owner = hub.user("owner")
        node_dir = tmp / "node"
        edge_bytecode(True)
        node = hub.start_node(owner, node_dir, "bench-node", verbose=False)
        time.sleep(3.0)  # a few heartbeats: settled, idle
        p = psutil.Process(node.p.pid)
        rss = p.memory_info().rss
        children = sum(c.memory_info().rss for c in p.children(recursive=True))
        node.stop()

        # Seen through the hub: a login holds one connection, so listening as the node would
        # close the connection of the node being timed.
        node_id = json.loads((node_dir / "node.json").read_text())["node_id"]

        def record() -> dict[str, Any]:
            (mine,) = [n for n in owner.nodes() if n["id"] == node_id]
            return mine

        def start(name: str, flags: list[str]) -> tuple[float, float, Path]:
            """Seconds from starting the node to its first heartbeat, as the hub saw it, and
            the CPU seconds the node had used by then."""
            wait_for("the hub to see the node stopped", lambda: record()["state"] == "offline", 30)
            log = tmp / f"{name}.log"
            t = time.time()
            cmd = [sys.executable, *flags, "-m", "edge.cli", "--data-dir", str(node_dir),
                   "--always-run", "--dashboard-port", "0"]  # fmt: skip
            again = Proc(name, cmd, log)
            try:
                # hello makes it idle; its first heartbeat follows at once, the next one a
                # heartbeat interval (0.5 s) later: its last_seen a moment after is the first's.
                wait_for("the node's hello", lambda: record()["state"] == "idle", 30, [again])
                times = psutil.Process(again.p.pid).cpu_times()
                time.sleep(0.1)
                return float(record()["last_seen"]) - t, times.user + times.system, log
            finally:
                again.stop()

        # Interleaved, so a burst of load on this shared machine falls on both alike.
        cold: list[float] = []
        cpu: list[float] = []
        source: list[float] = []
        for i in range(starts):
            edge_bytecode(False)
            source.append(start(f"source-{i}", [])[0])
            edge_bytecode(True)
            took, used, _ = start(f"cold-{i}", [])
            cold.append(took)
            cpu.append(used)
        logs = [start(f"importtime-{i}", ["-X", "importtime"])[2] for i in range(3)]
        imports = parse_importtime([log.read_text() for log in logs])
    finally:
        hub.stop()
    return {
        "cpython_rss_idle_mb": round(rss / 2**20, 1),
        "cpython_rss_idle_with_worker_mb": round((rss + children) / 2**20, 1),
        "cold_start_to_heartbeat_ms": median_ms(cold),
        "cold_start_from_source_ms": median_ms(source),
        "cold_start_cpu_ms": median_ms(cpu),
        "node_imports": imports,
    }


def micropython_heap() -> dict[str, Any]:
    script = ROOT / "tools" / "mp_min_heap.py"
    if not script.exists():
        return {"skipped": "tools/mp_min_heap.py is missing"}
    proc = subprocess.run(
        [sys.executable, str(script), "--json"], capture_output=True, text=True, timeout=900
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"mp_min_heap.py failed ({proc.returncode}): {proc.stderr[-500:]}"}
    data: dict[str, Any] = json.loads(lines[-1])
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    p.add_argument("--reps", type=int, default=20, help="runs per overhead median (20)")
    p.add_argument("--skip-network", action="store_true", help="no hub/node/MicroPython parts")
    p.add_argument("--starts", type=int, default=5, help="node starts per cold-start median (5)")
    args = p.parse_args(argv)
    if args.reps < 3:
        p.error("--reps must be at least 3")

    def say(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    result: dict[str, Any] = {}
    say("wasm3 job overhead...")
    result.update(wasm3_overhead(args.reps))
    say("fib/sieve on wasm3, wasmtime, native C...")
    result["wasm3"] = timed_runs(lambda: Wasm3Executor(workers=1), lambda ex, s: ex.run(s))
    result["wasmtime"] = wasmtime_timings()
    with tempfile.TemporaryDirectory(prefix="deparrow-edge-bench-") as tmp:
        result["native_c"] = native_timings(Path(tmp))
        if not args.skip_network:
            say("an edge-run node on a real hub: RSS, cold start...")
            result.update(node_figures(Path(tmp), args.starts))
            say("MicroPython: smallest heap for a heartbeat + job cycle...")
            mp = micropython_heap()
            result["micropython"] = mp
            if "micropython_min_heap_kb" in mp:
                result["micropython_min_heap_kb"] = mp["micropython_min_heap_kb"]

    ok = True
    for key, (target, aim) in TARGETS.items():
        value = result.get(key)
        if value is None:
            say(f"{key:32} not measured")
            ok = ok and args.skip_network and key != "wasm3_job_overhead_ms"
            continue
        met = value <= target
        ok = ok and met
        verdict = f"target <= {target:g} {'met' if met else 'MISSED'}"
        if aim is not None:
            verdict += f"; aim <= {aim:g} {'met' if value <= aim else 'not yet'}"
        say(f"{key:32} {value:>9}  ({verdict})")
    for engine in ("wasm3", "wasmtime", "native_c"):
        say(f"{engine:10} {json.dumps(result.get(engine))}")
    if "node_imports" in result:
        imports = result["node_imports"]
        say(f"cold_start_from_source_ms {result['cold_start_from_source_ms']:>15}  (no bytecode)")
        say(f"cold_start_cpu_ms {result['cold_start_cpu_ms']:>23}  (CPU time, with bytecode)")
        say(
            f"the node's imports before its first heartbeat (-X importtime): {imports['modules']}"
            f" modules, top level {imports['top_level_ms']} ms; costliest top-level imports:"
        )
        for row in imports["top"]:
            say(f"  {row['module']:40} {row['cumulative_ms']:>7} ms  (own {row['self_ms']} ms)")
    result["ok"] = ok
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
