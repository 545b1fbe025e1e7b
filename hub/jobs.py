"""The job lifecycle: admission (price + hold), assignment, events, results, settlement.

Each step is one database transaction that changes the job row and moves credits together,
and each is idempotent: a duplicated MQTT message or a retried request finds the job already
past that step and changes nothing. No aiohttp and no MQTT here: the API and the bridge call in.
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import msgspec

import wasm_jobs
from edge import protocol
from hub import economy, reputation, verification
from hub.config import HubConfig
from hub.db import Database
from hub.economy import REVENUE
from hub.ledger import MICRO, InsufficientFunds, Ledger, format_micro, hold_id, wallet_id
from hub.models import DockerEngine, JobSpec, WasmEngine
from hub.replicas import LIVE, Replicas
from hub.store import Store, new_id


class JobError(Exception):
    """A request about a job that cannot be honoured; the message says why."""

    field: str | None = None

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class JobNotFound(JobError):
    pass


class NotAllowed(JobError):
    pass


class JobConflict(JobError):
    """An idempotency key reused for a different request."""


def wallet_of(user_id: str) -> str:
    return wallet_id(user_id)


def engine_message(spec: JobSpec) -> dict[str, Any]:
    """The `engine` object of an assign message (docs/protocol.md), per engine type."""
    e = spec.engine
    if isinstance(e, WasmEngine):
        return {"type": "wasm", "entrypoint": e.entrypoint, "args": list(e.args), "env": e.env}
    msg: dict[str, Any] = {
        "type": "docker" if isinstance(e, DockerEngine) else "native",
        "command": list(e.command),
        "env": dict(e.env),
        "network": e.network,
    }
    if isinstance(e, DockerEngine):
        msg.update(image=e.image, pids=e.pids)
    return msg


@dataclass(frozen=True)
class Assignment:
    node_id: str
    message: dict[str, Any]


class Jobs:
    def __init__(self, config: HubConfig, db: Database, store: Store, ledger: Ledger) -> None:
        self.config = config
        self.db = db
        self.store = store
        self.ledger = ledger
        self.max_attempts = config.max_attempts
        self.replicas = Replicas(db, store, ledger, self._proved)
        ledger.open_account(REVENUE, "revenue")

    def take_cancels(self) -> list[tuple[str, str, int]]:
        """(node, job, attempt) of replicas to stop on their nodes, decided since last asked:
        send them once the transaction that decided them has committed."""
        out, self.replicas.cancels = self.replicas.cancels, []
        return out

    # --- references --------------------------------------------------------------
    def resolve_ref(self, ref: str, field: str, limit: int) -> str:
        """Turn a module/input reference into the sha256 of a stored blob."""
        kind, _, value = ref.partition(":")
        if kind == "sha256":
            if not self.store.has_blob(value):
                raise JobError(f"{field}: no uploaded blob {ref}; upload it first", field)
            return value
        if kind == "base64":
            try:
                data = base64.b64decode("".join(value.split()), validate=True)
            except (binascii.Error, ValueError) as e:
                raise JobError(f"{field}: not valid base64 ({e})", field) from None
        elif kind == "example":
            examples = wasm_jobs.manifest()
            if value not in examples:
                names = ", ".join(sorted(examples))
                raise JobError(f"{field}: no example job {value!r} (have: {names})", field)
            data = wasm_jobs.path(examples[value]["module"]).read_bytes()
        else:  # the pattern in models.py already excludes this
            raise JobError(f"{field}: unknown reference {ref!r}", field)
        if len(data) > limit:
            raise JobError(f"{field}: {len(data)} bytes is over the {limit}-byte limit", field)
        return self.store.put_blob(data)

    # --- admission ----------------------------------------------------------------
    @staticmethod
    def replicas_of(spec: JobSpec) -> int:
        """k from `verify: {replicas: k}` (1 without it), or JobError saying what is wrong."""
        if spec.verify is None:
            return 1
        k = spec.verify.replicas
        top = verification.MAX_REPLICAS
        if not 1 <= k <= top:
            raise JobError(
                f"verify.replicas: {k} is not between 1 and {top}; 3 is usual (2 of 3 must"
                " agree), 5 tolerates two wrong nodes",
                "verify.replicas",
            )
        if not isinstance(spec.engine, WasmEngine):
            kind = "docker" if isinstance(spec.engine, DockerEngine) else "native"
            raise JobError(
                f"verify: only wasm jobs can be verified, not {kind}: replicas are compared"
                f" byte for byte, and a {kind} job may read the clock, random numbers or the"
                " network, so honest nodes would disagree. Drop `verify` or use a wasm module",
                "verify",
            )
        if spec.type == "service":
            raise JobError(
                "verify: a service runs until stopped and has no single result to compare;"
                " only batch jobs can be verified",
                "verify",
            )
        return k

    def submit(self, owner: str, spec: JobSpec, submit_key: str | None = None) -> sqlite3.Row:
        """Validate, price on the server, hold the maximum, queue. InsufficientFunds: nothing
        is stored. A retried submission with the same key returns the first job."""
        if submit_key:
            existing = self.store.job_by_submit_key(owner, submit_key)
            if existing is not None:
                if msgspec.json.decode(existing["spec"], type=JobSpec) != spec:
                    raise JobConflict(
                        "that idempotency key was used for a different job: "
                        f"{existing['id']}; use a new key for a new job"
                    )
                return existing
        service = spec.type == "service"
        limit = self.config.max_service_s if service else self.config.max_timeout_s
        if spec.timeout > limit:
            what = "a service's lifetime limit" if service else "limit"
            raise JobError(f"timeout: {spec.timeout}s is over the hub's {limit}s {what}", "timeout")
        if spec.resources.gpu:
            raise JobError("resources.gpu: GPU jobs are not supported yet", "resources.gpu")
        module: str | None = None
        if spec.gas is not None and not isinstance(spec.engine, WasmEngine):
            raise JobError("gas: a gas budget applies to wasm jobs only", "gas")
        k = self.replicas_of(spec)
        if isinstance(spec.engine, WasmEngine):
            limit = self.config.max_module_bytes
            module = self.resolve_ref(spec.engine.module, "engine.module", limit)
            head = self.store.blob_head(module, 4)
            if head != b"\0asm":
                raise JobError(
                    "engine.module: not a WebAssembly module (it does not start with \\0asm)",
                    "engine.module",
                )
        stdin = (
            self.resolve_ref(spec.input, "input", self.config.max_input_bytes)
            if spec.input
            else None
        )
        if service:  # one period held ahead (or the whole lifetime, when shorter)
            period = min(spec.timeout, self.config.service_period_s)
            price = economy.period_price(spec.cpu_milli, period, spec.priority)
        else:  # a verified job holds the maximum of each of its k replicas
            price = k * economy.max_price(spec.cpu_milli, spec.timeout, spec.priority)
        job_id = new_id("j")
        now = time.time()
        insert = (
            "INSERT INTO jobs (id, owner, name, spec, state, priority, cpu_milli, memory_mb,"
            " timeout_s, module_sha256, input_sha256, hold, submitted_at, submit_key, reason,"
            " kind, replicas, parent, replica)"
            " VALUES (?,?,?,?,'queued',?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
        )

        def values(
            rid: str, hold: int, key: str | None, why: str, parent: str | None, n: int | None
        ) -> tuple[Any, ...]:
            return (
                rid,
                owner,
                spec.name,
                msgspec.json.encode(spec).decode(),
                spec.priority,
                spec.cpu_milli,
                spec.resources.memory_mb,
                spec.timeout,
                module,
                stdin,
                hold,
                now,
                key,
                why,
                spec.type,
                k if parent is None else 1,
                parent,
                n,
            )

        with self.db.transaction() as c:
            self.ledger.place_hold(
                job_id, wallet_of(owner), price, reason=f"hold for job {job_id} ({spec.name})"
            )
            key = owner + ":" + submit_key if submit_key else None  # one key space per owner
            why = "waiting for an idle node"
            if k > 1:
                why = f"waiting for {k} idle nodes of distinct owners"
            c.execute(insert, values(job_id, price, key, why, None, None))
            if k > 1:
                for n in range(1, k + 1):  # the replicas, placed by the scheduler
                    rid = new_id("j")
                    c.execute(insert, values(rid, 0, None, "waiting for an idle node", job_id, n))
        row = self.store.job(job_id)
        assert row is not None
        return row

    # --- assignment ---------------------------------------------------------------
    def assign(self, job: sqlite3.Row, node_id: str) -> Assignment | None:
        """Mark a queued job assigned to node_id and build the assign message."""
        attempt = int(job["attempt"]) + 1
        with self.db.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET state = 'assigned', node = ?, attempt = ?, assigned_at = ?,"
                " reason = NULL WHERE id = ? AND state = 'queued'",
                (node_id, attempt, time.time(), job["id"]),
            )
            if cur.rowcount != 1:
                return None
            if job["parent"] is not None:  # a replica: its verified job is under way
                c.execute(
                    "UPDATE jobs SET state = 'running', assigned_at = ?, reason = NULL"
                    " WHERE id = ? AND state = 'queued'",
                    (time.time(), job["parent"]),
                )
        return Assignment(node_id, self.assign_message(job["id"]))

    def assign_message(self, job_id: str) -> dict[str, Any]:
        job = self.store.job(job_id)
        assert job is not None
        spec = msgspec.json.decode(job["spec"], type=JobSpec)
        module = self.store.blob(job["module_sha256"]) if job["module_sha256"] else None
        stdin = self.store.blob(job["input_sha256"]) if job["input_sha256"] else None
        engine = engine_message(spec)
        msg: dict[str, Any] = protocol.assign(
            job_id,
            int(job["attempt"]),
            engine,
            base64.b64encode(module).decode() if module is not None else None,
            job["module_sha256"],
            base64.b64encode(stdin).decode() if stdin is not None else None,
            int(job["timeout_s"]),
            int(job["memory_mb"]),
            spec.gas,
        )
        return msg

    # --- node reports -------------------------------------------------------------
    def on_event(self, node_id: str, msg: dict[str, Any]) -> bool:
        """A node says a job is accepted/running. Stale or foreign events change nothing."""
        if msg.get("state") == protocol.REJECTED:
            job = self.store.job(str(msg.get("job_id")))
            if job is None or job["node"] != node_id or job["attempt"] != msg.get("attempt"):
                return False
            why = f"node {node_id} turned it down ({msg.get('detail') or 'no reason'})"
            # Not idle until its next heartbeat says so: no assign/reject ping-pong.
            self.store.update_node(node_id, state=protocol.BUSY)
            return self.requeue(job, why + "; waiting for another")
        if msg.get("state") not in (protocol.ACCEPTED, protocol.RUNNING):
            return False
        with self.db.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET state = 'running', started_at = COALESCE(started_at, ?1),"
                " period_start = CASE kind WHEN 'service' THEN COALESCE(period_start, ?1) END"
                " WHERE id = ?2 AND node = ?3 AND attempt = ?4 AND state = 'assigned'",
                (time.time(), msg.get("job_id"), node_id, msg.get("attempt")),
            )
            return cur.rowcount == 1

    def on_result(self, node_id: str, msg: dict[str, Any]) -> str:
        """Verify and settle a node's result. Returns what happened, for the log."""
        job = self.store.job(str(msg.get("job_id")))
        node = self.store.node(node_id)
        if job is None or node is None:
            return "ignored: unknown job or node"
        if job["node"] != node_id or job["attempt"] != msg.get("attempt"):
            return "ignored: not this node's current attempt"
        if job["state"] not in ("assigned", "running"):
            return "ignored: job already " + str(job["state"])
        try:
            stdout = base64.b64decode(msg.get("stdout_b64") or "", validate=True)
            stderr = base64.b64decode(msg.get("stderr_b64") or "", validate=True)
        except (binascii.Error, ValueError):
            return "dropped: result output is not base64"
        if not protocol.verify_result(node["secret"], msg, stdout):
            return "dropped: result signature does not verify"
        now = time.time()
        observed_ms = int((now - float(job["assigned_at"] or now)) * 1000)
        # Bill the smaller of what the node reports and what the hub observed.
        wall_ms = max(0, min(int(msg["wall_ms"]), observed_ms))
        exit_code = msg.get("exit_code")
        if msg["state"] != protocol.COMPLETED and exit_code == -1:
            exit_code = None  # the job never exited: -1 is the wire's "no exit code"
        result = {
            "exit_code": exit_code,
            "stdout": stdout.decode("utf-8", "replace"),
            "stderr": stderr.decode("utf-8", "replace"),
            "returns": msg.get("returns"),
            "error": msg.get("error"),
            "digest": msg.get("digest"),
            "wall_ms": int(msg["wall_ms"]),
            "cpu_ms": int(msg["cpu_ms"]),
        }
        if job["kind"] == "service" and (
            msg["state"] == protocol.COMPLETED or msg.get("error") == "timeout"
        ):
            # A service that ends, or reaches the end of its lifetime, pays for the part of
            # the current period it ran; earlier periods were paid as they ended.
            self._settle_service(job, node, wall_ms, result, now)
            return "settled"
        if msg["state"] == protocol.COMPLETED and job["parent"] is not None:
            self.replicas.record(job, wall_ms, result, int(msg["exit_code"]), str(msg["digest"]))
            return "replica recorded"
        if msg["state"] == protocol.COMPLETED:
            self._settle(job, node, wall_ms, result)
            return "settled"
        error = str(msg.get("error") or "failed")
        if verification.node_caused(error):  # the node's fault: another node may do better
            self.node_failed(job, f"node {node_id} could not run it ({error})")
            return "retrying: node error"
        self._fail(job, error, result)
        return "refunded" if job["parent"] is None else "replica failed"

    def _settle(
        self, job: sqlite3.Row, node: sqlite3.Row, wall_ms: int, result: dict[str, Any]
    ) -> None:
        timeout = int(job["timeout_s"])
        pay = economy.node_pay(int(job["cpu_milli"]), wall_ms, timeout)
        charge = economy.job_charge(int(job["cpu_milli"]), wall_ms, timeout, job["priority"])
        payouts = [(wallet_of(node["owner"]), pay)]
        if charge > pay:
            payouts.append((REVENUE, charge - pay))
        payouts = [(a, n) for a, n in payouts if n > 0]
        with self.db.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET state = 'completed', cost = ?, result = ?, finished_at = ?,"
                " reason = NULL WHERE id = ? AND state IN ('assigned', 'running')",
                (charge, json.dumps(result), time.time(), job["id"]),
            )
            if cur.rowcount != 1:
                return
            self.ledger.close_hold(job["id"], payouts, reason="job completed " + job["id"])
            # What it earned and the reputation it gained: one statement on the hot path.
            rep, weight = reputation.assignment("completed")
            c.execute(
                f"UPDATE nodes SET earned = earned + ?, {rep} WHERE id = ?",
                (pay, weight, node["id"]),
            )
            self._proved(node, job["owner"])

    def _proved(self, node: sqlite3.Row, job_owner: str) -> None:
        """A node's first job for someone else, signed and paid: its referral bonus is due."""
        if job_owner != node["owner"]:
            first = self.db.conn.execute(
                "UPDATE nodes SET proved_at = ? WHERE id = ? AND proved_at IS NULL",
                (time.time(), node["id"]),
            )
            if first.rowcount == 1:
                self._referral_bonus(node, job_owner)

    # --- service jobs: billed per period ------------------------------------------
    def _period_s(self, job: sqlite3.Row) -> int:
        return min(int(job["timeout_s"]), self.config.service_period_s)

    def _service_split(self, job: sqlite3.Row, ran_ms: int) -> tuple[int, int]:
        """(node pay, charge) for ran_ms of the current period, capped at a whole period."""
        period = self._period_s(job)
        ran_ms = max(0, min(ran_ms, period * 1000))
        if ran_ms == 0:
            return 0, 0
        cpu = int(job["cpu_milli"])
        return (
            economy.node_pay(cpu, ran_ms, period),
            economy.job_charge(cpu, ran_ms, period, job["priority"]),
        )

    def _payouts(self, node: sqlite3.Row, pay: int, charge: int) -> list[tuple[str, int]]:
        payouts = [(wallet_of(node["owner"]), pay), (REVENUE, charge - pay)]
        return [(a, n) for a, n in payouts if n > 0]

    def _close_service(
        self,
        job: sqlite3.Row,
        node_id: str,
        ran_ms: int,
        why: str,
        result: dict[str, Any] | None = None,
    ) -> None:
        """Inside the caller's transaction: pay the current period up to ran_ms, refund the
        rest of the hold, add the charge to the job's cost. The job row's state is the
        caller's (it has already moved it, which makes this run once)."""
        node = self.store.node(node_id)
        pay, charge = self._service_split(job, ran_ms) if node is not None else (0, 0)
        c = self.db.conn
        payouts = self._payouts(node, pay, charge) if node is not None else []
        self.ledger.close_hold(job["id"], payouts, reason=f"service job {job['id']} {why}")
        c.execute(
            "UPDATE jobs SET cost = COALESCE(cost, 0) + ?, period_start = NULL,"
            " result = COALESCE(?, result) WHERE id = ?",
            (charge, json.dumps(result) if result else None, job["id"]),
        )
        if node is not None and pay:
            c.execute("UPDATE nodes SET earned = earned + ? WHERE id = ?", (pay, node_id))

    def _settle_service(
        self,
        job: sqlite3.Row,
        node: sqlite3.Row,
        wall_ms: int,
        result: dict[str, Any],
        now: float,
    ) -> None:
        # The smaller of the node's word (its run's wall time, less the periods already
        # paid) and what the hub saw since the current period began.
        since = float(job["period_start"] or now)
        ran_ms = min(
            int((now - since) * 1000),
            wall_ms - int(job["periods_billed"]) * self._period_s(job) * 1000,
        )
        with self.db.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET state = 'completed', finished_at = ?, reason = NULL"
                " WHERE id = ? AND state IN ('assigned', 'running')",
                (now, job["id"]),
            )
            if cur.rowcount != 1:
                return
            self._close_service(job, node["id"], ran_ms, "ended", result)

    def bill_services(self, now: float | None = None) -> list[tuple[str, str, int]]:
        """Bill every whole period that running service jobs have completed by `now`.

        Each period is one transaction: the next period is held first (a top-up of the job's
        hold), then the period that ended is paid out of the hold to the node's owner. When
        the owner's wallet cannot hold the next period, the period that ended is paid, the
        rest refunded, and the job stops. Returns (node, job, attempt) of stopped jobs, for
        the bridge to send a cancel. Idempotent: a period is billed once, keyed by its number.
        """
        now = time.time() if now is None else now
        stopped: list[tuple[str, str, int]] = []
        for row in self.store.running_services():
            period = self._period_s(row)
            job: sqlite3.Row | None = row
            while job is not None and now - float(job["period_start"]) >= period:
                if self._bill_period(job, now):
                    stopped.append((str(job["node"]), str(job["id"]), int(job["attempt"])))
                    break
                billed = job["periods_billed"]
                job = self.store.job(job["id"])
                if job is not None and (
                    job["state"] != "running"
                    or job["period_start"] is None
                    or job["periods_billed"] == billed  # nothing billed: don't spin
                ):
                    job = None
        return stopped

    def _bill_period(self, job: sqlite3.Row, now: float) -> bool:
        """Bill the job's current period, which has ended. True when the job had to stop."""
        n = int(job["periods_billed"])
        period = self._period_s(job)
        node = self.store.node(job["node"])
        if node is None:
            return False
        pay, charge = self._service_split(job, period * 1000)
        price = economy.period_price(int(job["cpu_milli"]), period, job["priority"])
        wallet = wallet_of(job["owner"])
        with self.db.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET periods_billed = periods_billed + 1,"
                " period_start = period_start + ? WHERE id = ? AND state = 'running'"
                " AND periods_billed = ?",
                (period, job["id"], n),
            )
            if cur.rowcount != 1:
                return False  # billed already (a replay) or ended meanwhile
            try:
                with self.db.transaction():
                    self.ledger.place_hold(
                        job["id"],
                        wallet,
                        price,
                        idem_key=f"hold:{job['id']}:period:{n + 1}",
                        reason=f"hold for period {n + 2} of service job {job['id']}",
                    )
            except InsufficientFunds as e:
                c.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?, reason = ? WHERE id = ?",
                    (
                        now,
                        f"stopped after {n + 1} paid period(s): the next costs"
                        f" {format_micro(price)} credits and the wallet has"
                        f" {format_micro(e.available)}",
                        job["id"],
                    ),
                )
                self._close_service(job, node["id"], period * 1000, f"stopped: {e}")
                return True
            self.ledger.post(
                f"service:{job['id']}:period:{n}",
                f"service job {job['id']}: period {n + 1} ({period}s)",
                [(hold_id(job["id"]), -charge), *self._payouts(node, pay, charge)],
                {"job_id": job["id"], "period": n + 1},
            )
            c.execute(
                "UPDATE jobs SET cost = COALESCE(cost, 0) + ?, hold = hold + ? WHERE id = ?",
                (charge, price, job["id"]),
            )
            c.execute("UPDATE nodes SET earned = earned + ? WHERE id = ?", (pay, node["id"]))
        return False

    def _referral_bonus(self, node: sqlite3.Row, job_owner: str) -> None:
        """+500 to whoever referred this node's owner, when the node proves real (its first
        completed, signature-verified job). Once per node, never to the owner themselves."""
        owner = self.store.user(node["owner"])
        referrer = owner["referred_by"] if owner is not None else None
        if job_owner == node["owner"]:
            return  # a node proves real on someone else's work, not its owner's own jobs
        if not referrer or referrer == node["owner"] or self.store.user(referrer) is None:
            return
        amount = economy.RATES.referral_credits * MICRO
        self.ledger.open_account(wallet_of(referrer), "wallet", referrer)
        self.ledger.grant(
            "referral:" + node["id"],
            wallet_of(referrer),
            amount,
            f"referral bonus: node {node['id']} of {node['owner']} ran its first job",
        )

    def accrue_uptime(self, node_id: str, gap_ms: int) -> int:
        """Count gap_ms of availability; pay the owner what is due once it is worth a payout.
        Returns what was paid (µc). The payout's key is the amount paid before it, so a replay
        of the same step can never pay twice."""
        if gap_ms <= 0:
            return 0
        with self.db.transaction() as c:
            c.execute("UPDATE nodes SET uptime_ms = uptime_ms + ? WHERE id = ?", (gap_ms, node_id))
            node = self.store.node(node_id)
            assert node is not None
            due = economy.uptime_due(int(node["uptime_ms"]), int(node["uptime_paid"]))
            if due < economy.UPTIME_PAYOUT_MIN:
                return 0
            self.ledger.open_account(wallet_of(node["owner"]), "wallet", node["owner"])
            self.ledger.grant(
                f"uptime:{node_id}:{node['uptime_paid']}",
                wallet_of(node["owner"]),
                due,
                f"uptime of node {node_id}",
            )
            c.execute(
                "UPDATE nodes SET uptime_paid = uptime_paid + ?, earned = earned + ? WHERE id = ?",
                (due, due, node_id),
            )
            return due

    def _fail(self, job: sqlite3.Row, reason: str, result: dict[str, Any] | None) -> None:
        if job["replicas"] > 1:  # a verified job: its replicas stop with it
            with self.db.transaction():
                self.replicas.end(job, "failed", reason)
            return
        if job["parent"] is not None:  # a replica: no hold of its own; the replicas decide
            with self.db.transaction() as c:
                cur = c.execute(
                    "UPDATE jobs SET state = 'failed', cost = 0, result = ?, finished_at = ?,"
                    " reason = ?, verdict = 'failed', paid = 0"
                    " WHERE id = ? AND state IN ('queued', 'assigned', 'running')",
                    (json.dumps(result) if result else None, time.time(), reason, job["id"]),
                )
                if cur.rowcount == 1:
                    self.replicas.decide(str(job["parent"]))
            return
        with self.db.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET state = 'failed', cost = COALESCE(cost, 0), result = ?,"
                " finished_at = ?,"
                " reason = ? WHERE id = ? AND state NOT IN ('completed', 'failed', 'cancelled')",
                (json.dumps(result) if result else None, time.time(), reason, job["id"]),
            )
            if cur.rowcount != 1:
                return
            self.ledger.refund_hold(job["id"], reason="job failed " + job["id"] + ": " + reason)

    def fail(self, job_id: str, reason: str) -> None:
        job = self.store.job(job_id)
        if job is not None:
            self._fail(job, reason, None)

    def node_failed(self, job: sqlite3.Row, why: str) -> bool:
        """The node lost this attempt of the job (offline, restarted, silent past the timeout,
        or its executor broke): not the job's fault. The node's reputation drops, and the job
        goes back to the queue for another node, until `max_attempts` attempts were lost;
        then it fails and its hold is refunded. Nobody was paid for a lost attempt, so the hold
        covers every retry. False when the attempt had already ended (a replay)."""
        row = self.store.job(job["id"])
        if row is None or row["attempt"] != job["attempt"] or row["state"] not in LIVE[1:]:
            return False
        tries = json.loads(row["tries"] or "[]")
        tries.append({"attempt": row["attempt"], "node": row["node"], "outcome": why,
                      "at": time.time()})  # fmt: skip
        lost = int(row["failures"]) + 1
        with self.db.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET failures = ?, tries = ? WHERE id = ? AND attempt = ?"
                " AND state IN ('assigned', 'running')",
                (lost, json.dumps(tries), row["id"], row["attempt"]),
            )
            if cur.rowcount != 1:
                return False
            if row["node"] is not None:
                reputation.record(c, str(row["node"]), "lost")
            if lost >= self.max_attempts:
                self._fail(row, f"{lost} attempts lost by their nodes, the last: {why}", None)
            else:
                self.requeue(
                    row,
                    f"{why}; retrying on another node"
                    f" (attempt {lost + 1} of at most {self.max_attempts})",
                )
        return True

    def requeue(self, job: sqlite3.Row, reason: str) -> bool:
        """Put an assigned job back in the queue (its node went away); the hold stays."""
        with self.db.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET state = 'queued', node = NULL, reason = ?, assigned_at = NULL,"
                " started_at = NULL, period_start = NULL"
                " WHERE id = ? AND attempt = ? AND state IN ('assigned', 'running')",
                (reason, job["id"], job["attempt"]),
            )
            return cur.rowcount == 1

    def cancel(self, user_id: str, job_id: str, is_admin: bool) -> tuple[sqlite3.Row, str | None]:
        """Cancel and refund. Repeating it is harmless. Returns (job, node to tell or None)."""
        job = self.store.job(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        if job["owner"] != user_id and not is_admin:
            raise JobNotFound(f"no job {job_id}")  # someone else's: don't confirm it exists
        if job["parent"] is not None:
            raise JobError(
                f"{job_id} is replica {job['replica']} of job {job['parent']}:"
                f" cancel {job['parent']}, which stops all its replicas"
            )
        if job["replicas"] > 1:
            with self.db.transaction():
                self.replicas.end(job, "cancelled", "cancelled by its owner")
            row = self.store.job(job_id)
            assert row is not None
            return row, None
        node = job["node"] if job["state"] in ("assigned", "running") else None
        now = time.time()
        with self.db.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET state = 'cancelled', cost = COALESCE(cost, 0), finished_at = ?,"
                " reason = 'cancelled by its owner'"
                " WHERE id = ? AND state IN ('queued', 'assigned', 'running')",
                (now, job_id),
            )
            if cur.rowcount != 1:
                node = None
            elif job["kind"] == "service" and job["period_start"] is not None and node:
                # The service ran until now: its current period is paid up to this second.
                ran_ms = int((now - float(job["period_start"])) * 1000)
                self._close_service(job, node, ran_ms, "cancelled by its owner")
            else:
                self.ledger.refund_hold(job_id, reason="job cancelled " + job_id)
        row = self.store.job(job_id)
        assert row is not None
        return row, node

    # --- views ----------------------------------------------------------------------
    def view(self, job: sqlite3.Row) -> dict[str, Any]:
        result = json.loads(job["result"]) if job["result"] else None
        verified = self.replicas.view(job)
        reason = job["reason"]
        if verified is not None and reason is None and job["state"] in LIVE:
            # Under way: say why a replica still waits, if one does.
            reason = next(
                (
                    f"replica {r['replica']}: {r['reason']}"
                    for r in self.store.replicas(job["id"])
                    if r["state"] == "queued" and r["reason"]
                ),
                None,
            )
        return {
            "id": job["id"],
            "name": job["name"],
            "state": job["state"],
            "owner": job["owner"],
            "node": job["node"],
            "attempt": job["attempt"],
            "priority": job["priority"],
            "hold": format_micro(int(job["hold"])),
            "cost": format_micro(int(job["cost"])) if job["cost"] is not None else None,
            "reason": reason,
            "timings": {
                "submitted_at": job["submitted_at"],
                "assigned_at": job["assigned_at"],
                "started_at": job["started_at"],
                "finished_at": job["finished_at"],
            },
            "result": result,
            "spec": json.loads(job["spec"]),
            "billing": self._billing_view(job),
            "retries": {
                "max_attempts": self.max_attempts,
                "node_failures": job["failures"],
                "history": json.loads(job["tries"] or "[]"),
            },
            "verification": verified,
            "replica_of": job["parent"],
        }

    def _billing_view(self, job: sqlite3.Row) -> dict[str, Any] | None:
        if job["kind"] != "service":
            return None
        period = self._period_s(job)
        return {
            "period_s": period,
            "periods_billed": job["periods_billed"],
            "period_start": job["period_start"],
            "period_price": format_micro(
                economy.period_price(int(job["cpu_milli"]), period, job["priority"])
            ),
        }
