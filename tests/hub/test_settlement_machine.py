"""Every attempt settled at most once, the books balanced after every step: a state machine.

Hypothesis drives random sequences of what happens to jobs on a small network — submissions
(batch, verified, service), scheduling passes, nodes starting, finishing, failing, crashing,
timing out, going offline and coming back, owners cancelling, nodes turning work down, the
clock moving on with liveness sweeps and service billing, and old messages arriving again — all
through the hub's real code on a real SQLite file, with real signed result messages. After
every step it checks what the hub promises about money:

- the ledger's own audit: all accounts sum to zero, no wallet below zero;
- an attempt's outcome, once written, never changes (but a lost attempt may be re-judged
  blamed once, when a later node breaks the same way);
- a job that is queued or over has no open attempt; one on a node has exactly its current one;
- what nodes earned is what their attempts were paid, and what jobs cost is what their
  attempts were charged: nothing paid twice, nothing paid outside an attempt;
- each submitter's wallet plus what it still has on hold is its funding less what its jobs
  cost: nothing refunded twice, nothing charged without a job;
- a job that is over holds nothing.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edge.core import protocol
from hub.app import open_services
from hub.config import HubConfig
from hub.ledger.money import MICRO
from hub.market.jobs import wallet_of
from hub.market.spec import JobSpec

T0 = 1_800_000_000.0
CRASH = "executor error: worker process killed by signal 11 (SIGSEGV)"
ERRORS = [
    None,  # completed
    "trap: unreachable",
    "timeout: job exceeded its 30s limit",
    "memory limit: job exceeded 64 MiB",
    CRASH,
    "executor error: cannot start a worker: out of file descriptors",
]
FUNDS = {"alice": 1000 * MICRO, "agent": 25 * MICRO}


class Settlement(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="dp-machine-")
        self.s = open_services(
            HubConfig(data_dir=Path(self.dir), welcome_grant_credits=0, service_period_s=600)
        )
        self.t = T0
        self.s.jobs.clock = lambda: self.t
        self.submitters: dict[str, str] = {}
        for name in FUNDS:
            uid, _, _ = self.s.create_user(name, "agent" if name == "agent" else "user")
            self.s.ledger.grant("fund:" + uid, wallet_of(uid), FUNDS[name], "test funds")
            self.submitters[name] = uid
        self.nodes = []
        for i in range(4):  # four nodes of three owners
            owner = self.s.create_user(f"owner{i % 3}", "user")[0] if i < 3 else self.owner0
            if i == 0:
                self.owner0 = owner
            token, _ = self.s.store.create_enrollment_token(owner, 60)
            node_id, _ = self.s.store.create_node(
                token=token, owner=owner, name=f"n{i}", engines=["wasm"], arch="x", cpu=2,
                memory_mb=512, mqtt_password="pw",
            )  # fmt: skip
            self.s.store.update_node(node_id, state=protocol.IDLE, last_seen=self.t)
            self.nodes.append(node_id)
        self.jobs: list[str] = []
        self.sent: list[tuple[str, dict[str, Any]]] = []  # (kind, message) for replays
        self.outcomes: dict[tuple[str, int], str] = {}

    def teardown(self) -> None:
        self.s.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- helpers ----------------------------------------------------------------------
    def _live(self) -> list[Any]:
        rows = self.s.db.query(
            "SELECT * FROM jobs WHERE state IN ('assigned', 'running') AND node IS NOT NULL"
            " ORDER BY rowid"
        )
        return list(rows)

    def _submit(self, who: str, raw: dict[str, Any]) -> None:
        spec = msgspec.convert(raw, JobSpec)
        try:
            job = self.s.jobs.submit(self.submitters[who], spec)
        except Exception as e:  # InsufficientFunds: nothing stored
            assert "insufficient" in str(e)
            return
        self.jobs.append(str(job["id"]))

    # --- rules ------------------------------------------------------------------------
    @rule(timeout=st.sampled_from([5, 30, 120]), high=st.booleans())
    def submit_batch(self, timeout: int, high: bool) -> None:
        engine = {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["5"]}
        prio = "high" if high else "normal"
        self._submit("alice", {"engine": engine, "timeout": timeout, "priority": prio})

    @rule()
    def submit_verified(self) -> None:
        engine = {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["5"]}
        self._submit("alice", {"engine": engine, "timeout": 30, "verify": {"replicas": 3}})

    @rule(lifetime=st.sampled_from([900, 3000]))
    def submit_service(self, lifetime: int) -> None:
        engine = {"type": "wasm", "module": "example:loop", "entrypoint": "_start"}
        self._submit("agent", {"type": "service", "engine": engine, "timeout": lifetime})

    @rule()
    def schedule(self) -> None:
        for a in self.s.scheduler.schedule():
            assert a.message["attempt"] >= 1

    @rule(i=st.integers(0, 50))
    def start(self, i: int) -> None:
        live = self._live()
        if live:
            job = live[i % len(live)]
            msg = protocol.event(job["node"], job["id"], job["attempt"], protocol.RUNNING)
            self.sent.append(("event", msg))
            self.s.jobs.on_event(job["node"], msg)

    @rule(i=st.integers(0, 50), error=st.sampled_from(ERRORS), ms=st.integers(0, 200_000))
    def finish(self, i: int, error: str | None, ms: int) -> None:
        live = self._live()
        if not live:
            return
        job = live[i % len(live)]
        node = self.s.store.node(job["node"])
        outcome = {
            "status": "completed" if error is None else "failed",
            "exit_code": 0 if error is None else None,
            "stdout": b"55" if error is None else b"",
            "returns": [5] if error is None else None,
            "error": error,
            "wall_ms": ms,
            "cpu_ms": 1,
        }
        msg = protocol.result(node["id"], node["secret"], job["id"], job["attempt"], outcome)
        self.sent.append(("result", msg))
        self.s.jobs.on_result(node["id"], msg)

    @rule(i=st.integers(0, 50))
    def reject(self, i: int) -> None:
        live = self._live()
        if live:
            job = live[i % len(live)]
            msg = protocol.event(job["node"], job["id"], job["attempt"], protocol.REJECTED)
            self.sent.append(("event", msg))
            self.s.jobs.on_event(job["node"], msg)

    @rule(i=st.integers(0, 3))
    def node_offline(self, i: int) -> None:
        self.s.scheduler.node_offline(self.nodes[i], "test")

    @rule(i=st.integers(0, 3))
    def node_back(self, i: int) -> None:
        self.s.store.update_node(self.nodes[i], state=protocol.IDLE, last_seen=self.t)

    @rule(seconds=st.sampled_from([1, 40, 200, 700, 4000]), beat=st.booleans())
    def time_passes(self, seconds: int, beat: bool) -> None:
        self.t += seconds
        if beat:  # the nodes that are up kept beating
            with self.s.db.transaction() as c:
                c.execute("UPDATE nodes SET last_seen = ? WHERE state != 'offline'", (self.t,))
        self.s.scheduler.sweep(now=self.t)
        self.s.jobs.bill_services(now=self.t)

    @rule(seconds=st.sampled_from([300, 700, 1300]))
    def all_goes_well_for_a_while(self, seconds: int) -> None:
        """The common case, in one step so that sequences reach it often: every job placed
        starts, every node keeps beating, time passes, services are billed."""
        self.schedule()
        for job in self._live():
            if job["state"] == "assigned":
                msg = protocol.event(job["node"], job["id"], job["attempt"], protocol.RUNNING)
                self.s.jobs.on_event(job["node"], msg)
        self.time_passes(seconds, True)

    @rule(i=st.integers(0, 50))
    def cancel(self, i: int) -> None:
        if self.jobs:
            job = self.s.store.job(self.jobs[i % len(self.jobs)])
            self.s.jobs.cancel(job["owner"], job["id"], False)

    @precondition(lambda self: bool(self.sent))
    @rule(i=st.integers(0, 500))
    def replay(self, i: int) -> None:
        kind, msg = self.sent[i % len(self.sent)]
        if kind == "result":
            self.s.jobs.on_result(msg["node_id"], msg)
        else:
            self.s.jobs.on_event(msg["node_id"], msg)

    # --- invariants ---------------------------------------------------------------------
    @invariant()
    def books_balance(self) -> None:
        audit = self.s.ledger.audit()
        assert audit.balanced, audit

    @invariant()
    def outcomes_are_written_once(self) -> None:
        for a in self.s.db.query("SELECT job, attempt, outcome FROM attempts"):
            key, now = (str(a["job"]), int(a["attempt"])), a["outcome"]
            before = self.outcomes.get(key)
            if before is not None:
                assert now == before or (before, now) == ("lost", "blamed"), (key, before, now)
            if now is not None:
                self.outcomes[key] = now

    @invariant()
    def one_open_attempt_per_job_on_a_node(self) -> None:
        open_ = {
            str(r["job"]): int(r["attempt"])
            for r in self.s.db.query("SELECT job, attempt FROM attempts WHERE outcome IS NULL")
        }
        n = self.s.db.query_one("SELECT count(*) AS n FROM attempts WHERE outcome IS NULL")
        assert n is not None and n["n"] == len(open_)
        for job in self.s.db.query("SELECT * FROM jobs WHERE replicas = 1"):
            if job["state"] in ("assigned", "running"):
                assert open_.get(str(job["id"])) == job["attempt"], dict(job)
            else:
                assert str(job["id"]) not in open_, dict(job)

    @invariant()
    def earned_and_cost_are_the_attempts(self) -> None:
        q = self.s.db.query_one
        earned = q("SELECT COALESCE(sum(earned), 0) AS n FROM nodes")
        paid = q("SELECT COALESCE(sum(pay), 0) AS n FROM attempts")
        assert earned is not None and paid is not None and earned["n"] == paid["n"]
        cost = q("SELECT COALESCE(sum(cost), 0) AS n FROM jobs WHERE parent IS NULL")
        charged = q("SELECT COALESCE(sum(charge), 0) AS n FROM attempts")
        assert cost is not None and charged is not None and cost["n"] == charged["n"]

    @invariant()
    def wallets_are_funding_less_cost(self) -> None:
        for name, uid in self.submitters.items():
            wallet = wallet_of(uid)
            cost = self.s.db.query_one(
                "SELECT COALESCE(sum(cost), 0) AS n FROM jobs WHERE owner = ? AND parent IS NULL",
                (uid,),
            )
            assert cost is not None
            have = self.s.ledger.balance(wallet) + self.s.ledger.held_for(wallet)
            assert have == FUNDS[name] - cost["n"], name

    @invariant()
    def finished_jobs_hold_nothing(self) -> None:
        for job in self.s.db.query(
            "SELECT id FROM jobs WHERE parent IS NULL AND state IN"
            " ('completed', 'failed', 'cancelled')"
        ):
            hold = self.s.ledger.hold(str(job["id"]))
            assert hold is None or hold.balance == 0, (job["id"], hold)


Settlement.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSettlement = Settlement.TestCase
