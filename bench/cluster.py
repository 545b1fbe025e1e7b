"""Several hub replicas on one PostgreSQL database and a broker cluster, against one hub.

    python bench/cluster.py [--json] [--replicas 1,2,4] [--nodes 20] [--rate 200]
        [--seconds 5] [--burst 2000] [--hb-nodes 200] [--hb-seconds 2] [--pg-fsync on|off]

In one run, the same measurements on:

- **baseline**: one hub on its embedded defaults (a SQLite file, its own Mosquitto), as
  bench/market.py's e2e part starts it;
- **N replicas** for each N in `--replicas`: `deparrow hub --db postgresql://...` N times on
  one database of a real PostgreSQL server (deparrow/pgserver.py; fsync on by default, as in
  production), on a cluster of three Mosquitto servers (deparrow/brokercluster.py;
  `--mqtt-share hubs`), one replica leading (it runs the scheduler).

Each configuration gets `--nodes` simulated nodes (tools/simnet.py in a process of its own,
`--speed 0`: jobs take no time on them; spread over the broker servers) and trivial Wasm jobs
(fib(1), the module uploaded once) submitted over REST, round-robin over the replicas
(bench/market.py's run_jobs):

- `jobs_per_s`: a burst of `--burst` jobs, settled per second (client's first submit to the
  hub's last settlement stamp);
- `p50_ms`/`p99_ms`: submit (client's clock) to settled (the hub's `finished_at`) with jobs
  paced at `--rate`/s for `--seconds`;
- `heartbeats_per_s`: `--hb-nodes` simulated nodes flood heartbeats at rising rates
  (bench/market.py's flood) until the replicas fall behind (every node's last beat processed
  later than 0.5 s after it was sent) or the one simulator process cannot send faster;
- `cpu_ms_per_job`: CPU (user + system, psutil) each process spent per job over the burst:
  each replica, PostgreSQL's server processes summed (the postmaster and every backend,
  those that exited too), the brokers summed, the simulator.

The scaling ratio is jobs/s of N replicas over 1 replica on PostgreSQL, and over the SQLite
baseline. Every configuration must settle every job and end with a balanced ledger audit,
or the bench fails. On a machine with few cores (this VM has 2) the replicas, PostgreSQL,
the brokers, the simulator and the client share them: jobs/s cannot grow with replicas
beyond the cores, which is why the CPU per job per replica is reported.

Prints a table, and as its last line one JSON object (`--json`: only that).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after the root: bench/edge.py is not the edge package

import psutil  # noqa: E402
from market import CpuMeter, Hub, SimProcess, caught_up, flood, run_jobs, summarize  # noqa: E402

import wasm_jobs  # noqa: E402
from deparrow.brokercluster import LocalBrokerCluster  # noqa: E402
from deparrow.client import Client, HubError  # noqa: E402
from deparrow.localnet import LocalHub, wait_for  # noqa: E402
from deparrow.pgserver import LocalPostgres  # noqa: E402

Say = Callable[[str], None]
# Where a paced job's time goes (medians, bench/market.py's summarize): the REST call until
# the job row exists, until the leader sent the assignment, until the node said running,
# until settled.
PHASES = ("submit_ms", "queued_ms", "to_node_ms", "to_settled_ms")


class BenchFailed(RuntimeError):
    pass


def pg_seconds(postmaster: psutil.Process) -> float:
    """CPU seconds of a PostgreSQL server: the postmaster, its live backends and (through the
    postmaster's reaped-children times) those that have exited."""
    t = postmaster.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for c in postmaster.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            ct = c.cpu_times()
            total += ct.user + ct.system
    return total


class ClusterCpuMeter(CpuMeter):
    """bench/market.py's CpuMeter, plus groups of processes summed as one entry (the broker
    servers) and a PostgreSQL server's processes as one entry."""

    def __init__(
        self, pids: dict[str, int], groups: dict[str, list[int]], postmaster: int | None
    ) -> None:
        self.groups = {k: [psutil.Process(p) for p in v] for k, v in groups.items()}
        self.pg = psutil.Process(postmaster) if postmaster is not None else None
        super().__init__(pids)

    def _read(self) -> dict[str, float]:
        out = super()._read()
        for name, procs in self.groups.items():
            out[name] = sum(sum(p.cpu_times()[:2]) for p in procs)
        if self.pg is not None:
            out["postgres"] = pg_seconds(self.pg)
        return out


def postmaster_pid(pg: LocalPostgres) -> int:
    return int((pg.data / "postmaster.pid").read_text().split()[0])


def leading(url: str) -> bool:
    try:
        return bool(Client(url).request("GET", "/readyz", auth=False).get("leading"))
    except (HubError, OSError):
        return False


def heartbeats(
    args: argparse.Namespace, hub: str, admin: Client, tmp: Path, say: Say
) -> dict[str, Any]:
    """bench/market.py's flood, against whichever replicas share the load: rates doubling from
    --hb-start until the hub falls behind (or the sender cannot go faster); when it falls
    behind at the first rate, halving instead (down to --hb-min) until it keeps up."""
    if args.hb_nodes <= 0:
        return {"heartbeats_per_s": None}
    user = admin.create_user("fleet")
    owner = Client(hub, user["token"])
    idents, log = tmp / "hb-identities.json", tmp / "hb-simnet.log"
    best, rate, sender_limited = 0.0, args.hb_start, False
    # Each step: offered/s, sent/s, ms from the last one sent to the last one processed, and
    # processed/s (all sent over the time from the first sent to the last processed).
    steps: list[list[float]] = []
    processed = 0.0
    behind_at: float | None = None
    while rate <= args.hb_max:
        _ids, sent = flood(hub, user["token"], args.hb_nodes, idents, rate, args.hb_seconds, log)
        achieved = sent["sent"] / sent["seconds"]
        seen = wait_for("the hub to catch up", partial(caught_up, owner, sent["last_sent"]), 300)
        assert seen is not None  # wait_for returns only what is true
        lag = max(0.0, max(seen) - sent["end"])
        through = sent["sent"] / max(1e-9, max(seen) - sent["start"])
        processed = max(processed, through)
        kept = lag <= 0.5
        steps.append([round(rate), round(achieved), round(lag * 1000), round(through)])
        say(
            f"    heartbeats offered {rate:7,.0f}/s, sent {achieved:7,.0f}/s: done "
            f"{lag * 1000:5.0f} ms after the last, {through:7,.0f}/s processed "
            f"{'- kept up' if kept else '- FELL BEHIND'}"
        )
        if not kept:
            behind_at = achieved
            if best == 0 and rate / 2 >= args.hb_min:
                rate /= 2
                continue
            break
        best = max(best, achieved)
        if behind_at is not None:
            break  # on the way down: this is the rate it keeps up with
        if achieved < 0.9 * rate:
            sender_limited = True  # the simulator's one process cannot send faster
            break
        rate *= 2
    return {
        "heartbeats_per_s": round(best),
        "heartbeats_sender_limited": sender_limited,
        "heartbeats_fell_behind_at": None if behind_at is None else round(behind_at),
        "heartbeats_max_processed_per_s": round(processed),
        "heartbeats_steps": steps,
    }


def measure(
    args: argparse.Namespace,
    name: str,
    urls: Sequence[str],
    admin: Client,
    pids: dict[str, int],
    groups: dict[str, list[int]],
    postmaster: int | None,
    tmp: Path,
    say: Say,
) -> dict[str, Any]:
    """The jobs, the latency, the CPU and the heartbeats of one configuration; fails unless
    every job settled and the ledger audit balances."""
    user = admin.create_user("bench")
    module_ref = Client(urls[0], user["token"]).upload(wasm_jobs.path("fib.wasm").read_bytes())
    sim: SimProcess | None = SimProcess(
        urls[0], user["token"], args.nodes, tmp / "simnet.log", "--speed", "0"
    )
    assert sim is not None
    try:
        say(f"  {args.nodes} simulated nodes online ({sim.ready['seconds']}s)")
        pids = {**pids, "simnet": sim.p.pid}

        missing: dict[str, int] = {}  # completed jobs without this timing stamp

        def jobs(count: int, rate: float | None, concurrency: int) -> dict[str, Any]:
            # However slow a configuration, every job must settle: wait for a slow one.
            views = asyncio.run(
                run_jobs(urls, user["token"], module_ref, count, rate, concurrency, settle_s=900)
            )
            s = summarize(views)
            for v in views:
                for stamp, t in v["timings"].items():
                    if t is None and v["state"] == "completed":
                        missing[stamp] = missing.get(stamp, 0) + 1
            if s["completed"] != s["jobs"] or s["jobs"] != count:
                states: dict[str, int] = {}
                for v in views:
                    states[v["state"]] = states.get(v["state"], 0) + 1
                raise BenchFailed(f"{name}: {count} jobs submitted, settled: {states}")
            return s

        jobs(min(50, args.burst), None, 8)  # warm up: connections, caches, the module
        paced = jobs(int(args.rate * args.seconds), args.rate, 64)
        say(
            f"  paced {paced['jobs']} jobs at {args.rate:g}/s: p50 {paced['p50_ms']:.1f} ms, "
            f"p99 {paced['p99_ms']:.1f} ms"
        )
        phases = {k: round(paced[k], 1) for k in PHASES}
        say(
            "    medians: REST submit {submit_ms} ms, queued {queued_ms}, assignment to running "
            "{to_node_ms}, running to settled {to_settled_ms}".format(**phases)
        )
        cpu = ClusterCpuMeter(pids, groups, postmaster)
        burst = jobs(args.burst, None, args.concurrency)
        used = cpu.used()
        per_job = {k: round(v / burst["completed"] * 1000, 2) for k, v in used.items()}
        say(
            f"  burst {burst['jobs']} jobs: {burst['jobs_per_s']:.0f} jobs/s; CPU ms per job: "
            + ", ".join(f"{k} {v:.2f}" for k, v in per_job.items())
        )
        if missing:
            say(f"  completed jobs without a timing stamp (a replica race?): {missing}")
        sim.stop()
        sim = None
        hb = heartbeats(args, urls[0], admin, tmp, say)
        audit = admin.audit()
        if not audit["balanced"]:
            raise BenchFailed(f"{name}: the ledger audit does not balance: {audit}")
        return {
            "hubs": len(urls),
            "jobs_per_s": round(burst["jobs_per_s"], 1),
            "burst_jobs": burst["jobs"],
            "p50_ms": round(paced["p50_ms"], 1),
            "p99_ms": round(paced["p99_ms"], 1),
            "paced_jobs": paced["jobs"],
            "paced_phases_ms": phases,
            "cpu_ms_per_job": per_job,
            "cpu_ms_per_job_total": round(sum(per_job.values()), 2),
            **hb,
            "completed_without_stamp": missing,
            "all_settled": True,
            "ledger_balanced": True,
        }
    finally:
        if sim is not None:
            sim.stop()


def run_baseline(args: argparse.Namespace, tmp: Path, say: Say) -> dict[str, Any]:
    say("baseline: one hub, SQLite, its own Mosquitto")
    hub = Hub(tmp / "hub", heartbeat_s=5.0)
    try:
        hub_proc = psutil.Process(hub.proc.p.pid)
        broker = next(c for c in hub_proc.children() if "mosquitto" in c.name())
        groups = {"brokers": [broker.pid]}
        return measure(
            args, "baseline", [hub.url], hub.admin, {"hub": hub_proc.pid}, groups, None, tmp, say
        )
    finally:
        hub.stop()


def run_cluster(
    args: argparse.Namespace, n: int, pg: LocalPostgres, tmp: Path, say: Say
) -> dict[str, Any]:
    say(f"{n} replica(s), PostgreSQL, three Mosquitto servers")
    db = pg.create_database(f"bench{n}")
    hubs: list[LocalHub] = []
    with LocalBrokerCluster(tmp / "brokers", 3) as brokers:
        shared = ("--db", db, "--mqtt-share", "hubs", "--mqtt-public-url",
                  ",".join(brokers.urls), "--welcome-grant", "1000000")  # fmt: skip
        try:
            for i in range(n):
                d = tmp / f"hub{i}"
                if i:  # the first made the admin; its token is the others' too
                    d.mkdir()
                    shutil.copy(tmp / "hub0" / "admin-token", d / "admin-token")
                hubs.append(
                    LocalHub(
                        d,
                        mqtt_url=brokers.hub_url_list(),
                        heartbeat_s=5.0,
                        extra=shared,
                        log_path=tmp / f"hub{i}.log",
                    )
                )
            urls = [h.url for h in hubs]
            wait_for("one replica to lead", lambda: sum(map(leading, urls)) == 1, 30)
            pids = {f"hub{i}": h.proc.p.pid for i, h in enumerate(hubs)}
            groups = {"brokers": [p.p.pid for p in brokers.procs if p is not None]}
            return measure(
                args, f"{n} replicas", urls, hubs[0].admin, pids, groups, postmaster_pid(pg),
                tmp, say,
            )  # fmt: skip
        finally:
            for h in hubs:
                h.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    p.add_argument("--replicas", default="1,2,4", help="hub replica counts to run (1,2,4)")
    p.add_argument("--nodes", type=int, default=20, help="simulated nodes (20)")
    p.add_argument("--rate", type=float, default=200.0, help="paced jobs/s (200)")
    p.add_argument("--seconds", type=float, default=5.0, help="paced phase, seconds (5)")
    p.add_argument("--burst", type=int, default=2000, help="jobs in the burst (2000)")
    p.add_argument("--concurrency", type=int, default=32, help="burst requests in flight (32)")
    p.add_argument("--hb-nodes", type=int, default=200, help="heartbeat flood nodes; 0: skip")
    p.add_argument("--hb-seconds", type=float, default=2.0, help="each flood step, seconds (2)")
    p.add_argument("--hb-start", type=float, default=2000.0, help="first flood rate/s (2000)")
    p.add_argument("--hb-max", type=float, default=40000.0, help="highest flood rate/s")
    p.add_argument(
        "--hb-min", type=float, default=250.0, help="lowest rate/s tried when halving (250)"
    )
    p.add_argument(
        "--pg-fsync",
        choices=("on", "off"),
        default="on",
        help="PostgreSQL durability: on (fsync, synchronous commit: production) or off",
    )
    args = p.parse_args(argv)
    counts = [int(x) for x in args.replicas.split(",") if x.strip()]

    def say(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    cpus = os.cpu_count() or 1
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    say(
        f"bench/cluster.py, {today}, {cpus} cores: every hub, PostgreSQL, the brokers, the "
        f"simulator and the client share them, so jobs/s cannot scale past the cores"
    )
    result: dict[str, Any] = {
        "date": today,
        "cpus": cpus,
        "nodes": args.nodes,
        "rate": args.rate,
        "burst": args.burst,
        "pg_fsync": args.pg_fsync == "on",
    }
    with tempfile.TemporaryDirectory(prefix="deparrow-cluster-") as t:
        tmp = Path(t)
        (tmp / "base").mkdir()
        base = run_baseline(args, tmp / "base", say)
        result["baseline_sqlite"] = base
        runs: dict[str, dict[str, Any]] = {}
        with LocalPostgres(fast=args.pg_fsync == "off") as pg:
            for n in counts:
                d = tmp / f"pg{n}"
                d.mkdir()
                runs[str(n)] = run_cluster(args, n, pg, d, say)
        result["postgres"] = runs
    one = runs.get("1")
    for r in runs.values():
        r["ratio_vs_1_replica"] = round(r["jobs_per_s"] / one["jobs_per_s"], 2) if one else None
        r["ratio_vs_sqlite"] = round(r["jobs_per_s"] / base["jobs_per_s"], 2)
    table(result, say)
    print(json.dumps(result))
    return 0


def table(result: dict[str, Any], say: Say) -> None:
    rows = [("SQLite, 1 hub", result["baseline_sqlite"])]
    rows += [(f"PostgreSQL, {n} repl.", r) for n, r in result["postgres"].items()]
    fsync = "fsync on" if result["pg_fsync"] else "fsync off"
    say("")
    say(f"{'':22} {'jobs/s':>7} {'÷1 PG':>6} {'÷SQLite':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'beats/s':>8}  CPU ms per job (burst)")  # fmt: skip
    for label, r in rows:
        hb = r.get("heartbeats_per_s")
        more = "+" if r.get("heartbeats_sender_limited") else ""
        hb_s = "n/m" if hb is None else f"{hb:,}{more}"
        if hb == 0 and r.get("heartbeats_fell_behind_at"):  # behind even at the lowest rate
            hb_s = f"<{r['heartbeats_fell_behind_at']:,}"
        cpu = r["cpu_ms_per_job"]
        hubs = [v for k, v in cpu.items() if k.startswith("hub")]
        others = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if not k.startswith("hub"))
        say(
            f"{label:22} {r['jobs_per_s']:7.0f} {r.get('ratio_vs_1_replica') or '':>6} "
            f"{r.get('ratio_vs_sqlite') or '':>7} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f} "
            f"{hb_s:>8}  hub(s) {'/'.join(f'{v:.2f}' for v in hubs)}; {others}; "
            f"total {r['cpu_ms_per_job_total']:.2f}"
        )
    say(
        f"PostgreSQL ran with {fsync}; beats/s with '+': the one simulator process could send "
        f"no faster, the hubs kept up; '<': behind at every rate tried. {result['cpus']} cores "
        f"here: the ratios are bounded by them; the CPU per job per replica is what more cores "
        f"would divide."
    )


if __name__ == "__main__":
    sys.exit(main())
