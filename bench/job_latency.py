"""End-to-end job latency: submit over REST -> MQTT assignment -> wasm3 on a node -> signed
result -> settlement, against the same job run directly on a warm local executor (the baseline,
measured in the same run).

    python bench/job_latency.py [--jobs 30] [--nodes 2] [--broker auto|mosquitto|embedded] [--json]

Prints figures, and as its last line one JSON object: median and p95 latency of a sequential
job, throughput of a burst, the local baseline and the overhead ratio. Anchor: Bacalhau reports
~630 ms average per no-op job.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import wasm_jobs  # noqa: E402
from deparrow.localnet import LocalHub  # noqa: E402
from edge.executors.wasm3 import Wasm3Executor  # noqa: E402

SPEC = {
    "name": "fib20",
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]},
    "timeout": 30,
}


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p * (len(values) - 1)))]


def baseline(n: int) -> float:
    module = wasm_jobs.path("fib.wasm").read_bytes()
    job = {
        "job_id": "b",
        "module": module,
        "entrypoint": "fib",
        "args": ["20"],
        "env": {},
        "stdin": b"",
        "timeout_s": 30,
        "memory_mb": 64,
    }
    with Wasm3Executor(workers=1) as ex:
        ex.run(job)  # warm the worker
        times = []
        for _ in range(n):
            t = time.perf_counter()
            ex.run(job)
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=30)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--broker", default="auto")
    ap.add_argument("--json", action="store_true", help="only the JSON line")
    args = ap.parse_args()
    say = (lambda *_: None) if args.json else print

    local_ms = baseline(args.jobs)
    say(f"baseline: fib(20) on a warm local executor: {local_ms:.1f} ms median")
    tmp = Path(tempfile.mkdtemp(prefix="deparrow-bench-"))
    hub = LocalHub(tmp / "hub", broker=args.broker, extra=["--welcome-grant", "100000"])
    procs = [hub.proc]
    try:
        admin = hub.admin
        _, client = hub.user("bench")
        for i in range(args.nodes):
            procs.append(hub.start_node(client, tmp / f"n{i}", f"n{i}", verbose=False))
        client.wait(client.submit(SPEC)["id"])  # warm up
        seq = []
        for _ in range(args.jobs):
            t = time.perf_counter()
            job = client.wait(client.submit(SPEC)["id"], poll_s=0.005)
            seq.append((time.perf_counter() - t) * 1000)
            assert job["state"] == "completed" and job["result"]["returns"] == [6765], job
        say(
            f"sequential: {args.jobs} jobs, median {statistics.median(seq):.1f} ms, "
            f"p95 {pct(seq, 0.95):.1f} ms (submit to settled, polled every 5 ms)"
        )
        t = time.perf_counter()
        ids = [client.submit(SPEC)["id"] for _ in range(args.jobs)]
        for jid in ids:
            assert client.wait(jid, poll_s=0.01)["state"] == "completed"
        burst_s = time.perf_counter() - t
        rate = args.jobs / burst_s
        say(f"burst: {args.jobs} jobs on {args.nodes} nodes in {burst_s:.2f} s = {rate:.1f} jobs/s")
        audit = admin.request("GET", "/api/v1/ledger/audit")
        result = {
            "jobs": args.jobs,
            "nodes": args.nodes,
            "broker": admin.status()["broker"]["kind"],
            "local_ms": round(local_ms, 2),
            "e2e_median_ms": round(statistics.median(seq), 1),
            "e2e_p95_ms": round(pct(seq, 0.95), 1),
            "overhead_ratio": round(statistics.median(seq) / local_ms, 1),
            "burst_jobs_per_s": round(rate, 1),
            "ledger_balanced": audit["balanced"],
            "bacalhau_noop_ms": 630,
        }
        print(json.dumps(result))
    finally:
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    main()
