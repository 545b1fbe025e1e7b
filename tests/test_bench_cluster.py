"""bench/cluster.py runs end to end at tiny sizes: the SQLite baseline, one and two hub
replicas on a real PostgreSQL and three Mosquitto servers, every job settled, the ledger
balanced. No figure is asserted: benches print speeds, tests check that they run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.mosquitto


def test_the_cluster_bench_runs_end_to_end() -> None:
    cmd = [
        sys.executable, str(ROOT / "bench" / "cluster.py"), "--json",
        "--replicas", "1,2", "--nodes", "5", "--rate", "20", "--seconds", "1",
        "--burst", "20", "--hb-nodes", "10", "--hb-start", "200", "--hb-max", "200",
        "--hb-min", "200", "--hb-seconds", "0.5", "--pg-fsync", "off",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["cpus"] >= 1 and out["pg_fsync"] is False
    configs = [out["baseline_sqlite"], *out["postgres"].values()]
    assert [c["hubs"] for c in configs] == [1, 1, 2]
    for c in configs:
        assert c["all_settled"] and c["ledger_balanced"]
        assert c["burst_jobs"] == 20 and c["paced_jobs"] == 20
        assert c["jobs_per_s"] > 0 and c["heartbeats_per_s"] is not None
        assert c["cpu_ms_per_job"]["brokers"] >= 0
    two = out["postgres"]["2"]
    assert {"hub0", "hub1", "postgres", "simnet"} <= set(two["cpu_ms_per_job"])
    # Ratios are there (rounded to 2 places, a slow run may print 0.0): the shape, not a speed.
    assert isinstance(two["ratio_vs_1_replica"], float) and two["ratio_vs_1_replica"] >= 0
    assert isinstance(two["ratio_vs_sqlite"], float) and two["ratio_vs_sqlite"] >= 0
