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

from edge.executors.wasm3 import Wasm3Executor  # noqa: E402
from hub.broker import free_port  # noqa: E402
from hub.client import Client  # noqa: E402
from hub.demo import Proc, _wait_for  # noqa: E402

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
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = [
        Proc(
            "hub",
            [
                sys.executable,
                "-m",
                "hub.cli",
                "hub",
                "--port",
                str(port),
                "--data-dir",
                str(tmp / "hub"),
                "--broker",
                args.broker,
                "--broker-port",
                "0",
                "--heartbeat",
                "1",
                "--welcome-grant",
                "100000",
            ],
            tmp / "hub.log",
        )
    ]
    try:
        token_path = tmp / "hub" / "admin-token"
        probe = Client(url)
        _wait_for(
            "hub", lambda: token_path.exists() and probe.status()["broker"]["connected"], 60, procs
        )
        admin = Client(url, token_path.read_text().strip())
        user = admin.create_user("bench")
        client = Client(url, user["token"])
        for i in range(args.nodes):
            tok = client.enrollment_token()["token"]
            procs.append(
                Proc(
                    f"node{i}",
                    [
                        sys.executable,
                        "-m",
                        "edge.cli",
                        "--hub",
                        url,
                        "--token",
                        tok,
                        "--data-dir",
                        str(tmp / f"n{i}"),
                    ],
                    tmp / f"n{i}.log",
                )
            )
        _wait_for(
            "nodes",
            lambda: sum(n["state"] == "idle" for n in client.nodes()) == args.nodes,
            60,
            procs,
        )
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
