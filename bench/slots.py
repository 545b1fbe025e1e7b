"""One real node running CPU-bound jobs one at a time against all its slots at once.

    python bench/slots.py [--json] [--jobs 12] [--fib 35] [--slots N] [--rounds 3]

A real hub (its own broker, as `deparrow hub` starts by default) and one real `edge-run` node
on this machine, with its real wasm executor (pywasm3 workers, one per slot), started twice:
`--max-jobs 1`, then `--max-jobs N` (default: os.cpu_count()), alternated for --rounds rounds
so that the load of whatever else runs on the machine hits both alike. Each time, after a
warm-up job per slot, --jobs fib(--fib) jobs (wasm-jobs/fib.wasm, about 0.45 s each for
fib(35) on a quiet core here) are submitted at once over REST, 1 CPU each, and waited for.
Per run:

- wall_s: from the first submission to the last job settled (the hub's finished_at stamp;
  same machine, same clock), and jobs_per_s = jobs / wall_s;
- most_at_once: the most jobs the hub saw running at the same time (their started_at and
  finished_at), which says the slots were used;
- node_cpu: CPU seconds (user + system) of the node process and its children (the wasm
  workers; psutil) over the run, divided by wall_s: 1.0 is one core kept busy.

The figures are the medians over the rounds (each round's are in the JSON), and the ratio all
slots / one slot of each. Every job is checked: completed, on the node of
its run, fib's right answer. Prints a table, and as its last line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from deparrow.client import Client  # noqa: E402
from deparrow.localnet import LocalHub, Proc, wait_for  # noqa: E402


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class NodeCpu:
    """CPU seconds of a process and its descendants: those alive (per pid) and those that
    ended and were waited for (the process's children_user/children_system)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.start = self._read()

    def _read(self) -> dict[int, float]:
        t = self.proc.cpu_times()
        seen = {-1: t.children_user + t.children_system, self.proc.pid: t.user + t.system}
        for child in self.proc.children(recursive=True):
            try:
                c = child.cpu_times()
            except psutil.NoSuchProcess:
                continue
            seen[child.pid] = c.user + c.system
        return seen

    def used_s(self) -> float:
        now = self._read()
        return sum(v - self.start.get(pid, 0.0) for pid, v in now.items())


def start_node(hub: LocalHub, owner: Client, name: str, slots: int, tmp: Path) -> Proc:
    token = owner.enrollment_token()["token"]
    cmd = [sys.executable, "-m", "edge.cli", "--hub", hub.url, "--token", token,
           "--name", name, "--data-dir", str(tmp / name), "--max-jobs", str(slots),
           "--always-run", "--dashboard-port", "0"]  # fmt: skip
    node = Proc(name, cmd, tmp / f"{name}.log")
    try:
        wait_for(
            f"node {name} to come online",
            lambda: any(n["name"] == name and n["state"] == "idle" for n in owner.nodes()),
            60,
            [node, hub.proc],
        )
    except BaseException:
        node.stop()
        raise
    return node


def most_at_once(jobs: list[dict[str, Any]]) -> int:
    edges = []
    for j in jobs:
        t = j["timings"]
        edges += [(t["started_at"], 1), (t["finished_at"], -1)]
    now = best = 0
    for _, step in sorted(edges):  # an end before a start at the same instant
        now += step
        best = max(best, now)
    return best


def one_run(
    hub: LocalHub,
    owner: Client,
    client: Client,
    slots: int,
    round_no: int,
    args: argparse.Namespace,
    tmp: Path,
) -> dict[str, Any]:
    name = f"node-{slots}-slots-{round_no}"  # a node of its own: its own identity and name
    node = start_node(hub, owner, name, slots, tmp)
    try:
        node_id = next(n["id"] for n in owner.nodes() if n["name"] == name)
        spec = {
            "name": f"fib{args.fib}",
            "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib",
                       "args": [str(args.fib)]},
            "resources": {"cpu": 1},
            "timeout": 120,
        }  # fmt: skip

        def wait_all(ids: list[str]) -> list[dict[str, Any]]:
            done = [client.wait(i, timeout_s=600, poll_s=0.05) for i in ids]
            for j in done:
                if j["state"] != "completed" or j["node"] != node_id:
                    raise RuntimeError(f"job {j['id']}: {j['state']} on {j['node']}: {j}")
                if j["result"]["returns"] != [fib(args.fib)]:
                    raise RuntimeError(f"job {j['id']}: fib({args.fib}) = {j['result']}")
            return done

        wait_all([client.submit(spec)["id"] for _ in range(slots)])  # warm every worker
        cpu = NodeCpu(node.p.pid)
        t0 = time.time()
        ids = [client.submit(spec)["id"] for _ in range(args.jobs)]
        done = wait_all(ids)
        wall = max(j["timings"]["finished_at"] for j in done) - t0
        used = cpu.used_s()
    finally:
        node.stop()
    owner.remove_node(node_id)  # gone from the hub before the next run's node
    return {
        "slots": slots,
        "jobs": len(done),
        "wall_s": round(wall, 3),
        "jobs_per_s": round(len(done) / wall, 3),
        "most_at_once": most_at_once(done),
        "node_cpu_s": round(used, 2),
        "node_cpu": round(used / wall, 2),
        "job_wall_ms_median": sorted(j["result"]["wall_ms"] for j in done)[len(done) // 2],
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the rounds (the upper one of an even count)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if key != "slots" and isinstance(value, (int, float)):
            out[key] = sorted(r[key] for r in runs)[len(runs) // 2]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    p.add_argument("--jobs", type=int, default=12, help="jobs per run (default 12)")
    p.add_argument("--fib", type=int, default=35, help="the fib argument (default 35)")
    p.add_argument("--slots", type=int, default=os.cpu_count() or 1, help="slots of the second run")
    p.add_argument("--rounds", type=int, default=3, help="rounds of both runs (default 3)")
    args = p.parse_args(argv)
    if min(args.jobs, args.slots, args.rounds) < 1 or not 1 <= args.fib <= 60:
        p.error("--jobs, --slots and --rounds must be at least 1, --fib from 1 to 60")

    def say(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    started = time.perf_counter()
    result: dict[str, Any] = {"cpus": os.cpu_count(), "fib": args.fib, "jobs": args.jobs}
    with tempfile.TemporaryDirectory(prefix="deparrow-slots-bench-") as tmp_name:
        tmp = Path(tmp_name)
        hub = LocalHub(tmp / "hub", heartbeat_s=0.5, extra=["--welcome-grant", "100000"])
        try:
            _, owner = hub.user("owner")
            _, client = hub.user("bench")
            rounds: dict[int, list[dict[str, Any]]] = {1: [], args.slots: []}
            for n in range(1, args.rounds + 1):
                for slots in rounds:
                    say(f"round {n}: {args.jobs} x fib({args.fib}), {slots} slot(s)...")
                    rounds[slots].append(one_run(hub, owner, client, slots, n, args, tmp))
            result["balanced"] = bool(hub.admin.audit()["balanced"])
        finally:
            hub.stop()
    runs = [median_run(rounds[slots]) for slots in rounds]
    one, every = runs
    result["one_slot"], result["all_slots"] = one, every
    result["rounds"] = {str(k): v for k, v in rounds.items()}
    result["ratio"] = {
        k: round(every[k] / one[k], 2) if one[k] else float("nan")
        for k in ("jobs_per_s", "wall_s", "node_cpu")
    }
    result["bench_s"] = round(time.perf_counter() - started, 1)

    say(
        f"\n{args.jobs} x fib({args.fib}), 1 CPU each, one node ({result['cpus']} CPUs here); "
        f"medians of {args.rounds} rounds"
    )
    say(f"{'slots':>5} {'jobs/s':>7} {'wall s':>7} {'at once':>8} {'node CPU':>9} {'job ms':>7}")
    for run in runs:
        cells = (run["slots"], run["jobs_per_s"], run["wall_s"], run["most_at_once"])
        say("{:>5} {:>7} {:>7} {:>8}".format(*cells)
            + f" {run['node_cpu']:>8}x {run['job_wall_ms_median']:>7}")  # fmt: skip
    ratio = result["ratio"]
    say(
        f"ratio {every['slots']} slots / 1 slot: jobs/s {ratio['jobs_per_s']}x, wall "
        f"{ratio['wall_s']}x, node CPU {ratio['node_cpu']}x (whole bench {result['bench_s']} s)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
