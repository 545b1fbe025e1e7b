"""The job lifecycle: admission (price + hold), assignment, events, results, settlement.

Each step is one database transaction that changes the job row and moves credits together,
and each is idempotent: a duplicated MQTT message or a retried request finds the job already
past that step and changes nothing. No aiohttp and no MQTT here: the API and the bridge call in.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import json
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import msgspec

from edge.core import jobfiles, protocol
from hub.config import HubConfig
from hub.ledger import economy
from hub.ledger.economy import REVENUE
from hub.ledger.ledger import Ledger
from hub.ledger.money import wallet_id
from hub.market import admission, job_view, reputation, verification
from hub.market.attempts import Attempts, Stale
from hub.market.bonuses import Bonuses
from hub.market.errors import JobConflict, JobError, JobNotFound
from hub.market.replicas import LIVE, Replicas
from hub.market.retention import Retention
from hub.market.service_billing import ServiceBilling
from hub.market.spec import JobSpec, WasmEngine
from hub.store.db import Database
from hub.store.rows import Store, new_id


def wallet_of(user_id: str) -> str:
    return wallet_id(user_id)


P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Assignment:
    node_id: str
    message: dict[str, Any]


class Encoded:
    """Blobs as assignments carry them, in base64, by sha256: one module goes out with
    thousands of jobs, and is read and encoded once, not once per assignment. A blob's bytes
    never change under its sha256, so nothing held goes stale. The least recently used go
    first beyond `limit` characters; a blob larger than a quarter of it is never held."""

    def __init__(self, store: Store, limit: int = 64 << 20) -> None:
        self.store = store
        self.limit = limit
        self.held = 0
        self._by_digest: OrderedDict[str, str] = OrderedDict()

    def get(self, digest: str) -> str | None:
        text = self._by_digest.get(digest)
        if text is not None:
            self._by_digest.move_to_end(digest)
            return text
        data = self.store.blob(digest)
        if data is None:
            return None
        text = base64.b64encode(data).decode()
        if len(text) <= self.limit // 4:
            self._by_digest[digest] = text
            self.held += len(text)
            while self.held > self.limit:
                self.held -= len(self._by_digest.popitem(last=False)[1])
        return text


def _light(method: Callable[Concatenate[Jobs, P], R]) -> Callable[Concatenate[Jobs, P], R]:
    """Count the rows a method writes as light changes (Jobs.light_changes): a job that arrives,
    starts or ends changes which jobs wait and which nodes have room, never what any node can
    run, so the scheduler's next pass may plan from the head of the queue instead of reading it
    all (hub/market/scheduler.py). SQLite only: PostgreSQL has no change counter."""

    def counted(self: Jobs, /, *args: P.args, **kwargs: P.kwargs) -> R:
        conn = self.db.conn
        before = getattr(conn, "total_changes", None)
        try:
            return method(self, *args, **kwargs)
        finally:
            if before is not None:
                self.light_changes += conn.total_changes - before

    functools.update_wrapper(counted, method)
    return counted


class Jobs:
    def __init__(self, config: HubConfig, db: Database, store: Store, ledger: Ledger) -> None:
        self.config = config
        self.db = db
        self.store = store
        self.ledger = ledger
        self.max_attempts = config.max_attempts
        # The hub's clock; tests set it to drive time (liveness, billing, the uptime day).
        self.clock: Callable[[], float] = time.time
        self.attempts = Attempts(db)
        now = self._now
        self.bonuses = Bonuses(db, store, ledger, now)
        self.billing = ServiceBilling(
            config.service_period_s, db, store, ledger, self.attempts, self.bonuses, now
        )
        self.replicas = Replicas(db, store, ledger, self.bonuses.proved, self.attempts, now)
        store.clock = now  # blobs are timed by the hub's clock too (retention compares them)
        self.retention = Retention(config, db, now)
        self._encoded = Encoded(store)
        self.light_changes = 0  # rows written by the methods marked @_light
        # Jobs queued since the scheduler last asked (take_arrived), for its head plans: on
        # SQLite only, the one hub that plans (a PostgreSQL replica that does not lead would
        # only pile them up).
        self.arrived: list[str] = []
        self._track_arrivals = db.dialect == "sqlite"
        ledger.open_account(REVENUE, "revenue")

    def _now(self) -> float:
        return self.clock()  # looked up each time: a test may set self.clock later

    def accrue_uptime(self, node_id: str, gap_ms: int, now: float | None = None) -> int:
        """A node's availability since its previous heartbeat (hub/market/bonuses.py)."""
        return self.bonuses.accrue_uptime(node_id, gap_ms, now)

    def bill_services(self, now: float | None = None) -> list[tuple[str, str, int]]:
        """Bill every service period ended by `now` (hub/market/service_billing.py); returns the
        (node, job, attempt) of services that had to stop, for the bridge to cancel."""
        return self.billing.bill(now)

    def take_cancels(self) -> list[tuple[str, str, int]]:
        """(node, job, attempt) of replicas to stop on their nodes, decided since last asked:
        send them once the transaction that decided them has committed."""
        out, self.replicas.cancels = self.replicas.cancels, []
        return out

    def take_arrived(self) -> list[str]:
        """The jobs submitted since last asked (some maybe rolled back since: gone or not
        queued), for the scheduler to say why each waits."""
        out, self.arrived = self.arrived, []
        return out

    @_light
    def submit(self, owner: str, spec: JobSpec, submit_key: str | None = None) -> sqlite3.Row:
        """Validate, price on the server, hold the maximum, queue. InsufficientFunds: nothing
        is stored. A retried submission with the same key returns the first job."""
        existing = self.store.job_by_submit_key(owner, submit_key) if submit_key else None
        service = spec.type == "service"
        limit = self.config.max_service_s if service else self.config.max_timeout_s
        if spec.timeout > limit:
            what = "limit for a service's lifetime" if service else "limit"
            raise JobError(f"timeout: {spec.timeout}s is over the hub's {limit}s {what}", "timeout")
        if spec.resources.gpu and isinstance(spec.engine, WasmEngine):
            raise JobError(
                "resources.gpu: a wasm job cannot use a GPU; GPU jobs run on the docker or"
                " native engine",
                "resources.gpu",
            )
        module: str | None = None
        module_size = 0
        if spec.gas is not None and not isinstance(spec.engine, WasmEngine):
            raise JobError("gas: a gas budget applies to wasm jobs only", "gas")
        k = admission.replicas_of(spec)
        if isinstance(spec.engine, WasmEngine):
            limit = self.config.max_module_bytes
            module = admission.resolve_ref(self.store, spec.engine.module, "engine.module", limit)
            module_size, head = self.store.blob_facts(module, 4) or (0, b"")
            if head != b"\0asm":
                raise JobError(
                    "engine.module: not a WebAssembly module (it does not start with \\0asm)",
                    "engine.module",
                )
        stdin = (
            admission.resolve_ref(self.store, spec.input, "input", self.config.max_input_bytes)
            if spec.input
            else None
        )
        inputs = admission.resolve_inputs(self.store, spec, self.config.max_files_bytes)
        files_bytes = sum(size for _, _, size in inputs) if spec.files else None
        message_bytes = admission.message_bytes(
            spec,
            module_size,
            self.store.blob_size(stdin) if stdin else 0,
            inputs,
        )
        spec = admission.by_reference(spec, module, stdin, inputs)
        if existing is not None:
            if msgspec.json.decode(existing["spec"], type=JobSpec) != spec:
                raise JobConflict(
                    "that idempotency key was used for a different job: "
                    f"{existing['id']}; use a new key for a new job"
                )
            return existing
        if service:  # one period held ahead (or the whole lifetime, when shorter)
            period = min(spec.timeout, self.config.service_period_s)
            price = economy.period_price(
                spec.cpu_milli, period, spec.priority, gpus=spec.resources.gpu
            )
        else:  # a verified job holds the maximum of each of its k replicas
            price = k * economy.max_price(
                spec.cpu_milli, spec.timeout, spec.priority, gpus=spec.resources.gpu
            )
        job_id = new_id("j")
        now = self.clock()
        insert = (
            "INSERT INTO jobs (id, owner, name, spec, state, priority, cpu_milli, memory_mb,"
            " timeout_s, module_sha256, input_sha256, hold, submitted_at, submit_key, reason,"
            " kind, replicas, parent, replica, queued_at, files_bytes, gpu, message_bytes)"
            " VALUES (?,?,?,?,'queued',?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
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
                now,
                files_bytes,
                spec.resources.gpu,
                message_bytes,
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
            if self._track_arrivals:
                self.arrived.append(job_id)
            c.executemany(  # the replicas read their parent's
                "INSERT INTO job_files (job, role, path, sha256, size)"
                " VALUES (?, 'input', ?, ?, ?)",
                [(job_id, path, digest, size) for path, digest, size in inputs],
            )
            if k > 1:
                for n in range(1, k + 1):  # the replicas, placed by the scheduler
                    rid = new_id("j")
                    c.execute(insert, values(rid, 0, None, "waiting for an idle node", job_id, n))
                    if self._track_arrivals:
                        self.arrived.append(rid)
        row = self.store.job(job_id)
        assert row is not None
        return row

    # --- assignment ---------------------------------------------------------------
    def assign(self, job: sqlite3.Row, node_id: str) -> Assignment | None:
        """Mark a queued job assigned to node_id and build the assign message."""
        attempt = int(job["attempt"]) + 1
        now = self.clock()
        with self.db.transaction() as c:
            assigned = c.execute(
                "UPDATE jobs SET state = 'assigned', node = ?, attempt = ?, assigned_at = ?,"
                " reason = NULL WHERE id = ? AND state = 'queued' AND attempt = ?"
                " RETURNING periods_billed",
                (node_id, attempt, now, job["id"], attempt - 1),
            ).fetchall()  # all of it: the statement ends here, not at the next commit
            if not assigned:
                return None
            self.attempts.begin(job["id"], attempt, node_id, now, int(assigned[0][0]))
            # equally good nodes take turns: the one given a job longest ago goes first
            c.execute("UPDATE nodes SET last_job_at = ? WHERE id = ?", (now, node_id))
            if job["parent"] is not None:  # a replica: its verified job is under way
                c.execute(
                    "UPDATE jobs SET state = 'running', assigned_at = ?, reason = NULL"
                    " WHERE id = ? AND state = 'queued'",
                    (now, job["parent"]),
                )
        return Assignment(node_id, self.assign_message(job["id"]))

    def assign_message(self, job_id: str) -> dict[str, Any]:
        job = self.store.job(job_id)
        assert job is not None
        spec = msgspec.json.decode(job["spec"], type=JobSpec)
        module = self._encoded.get(job["module_sha256"]) if job["module_sha256"] else None
        stdin = self._encoded.get(job["input_sha256"]) if job["input_sha256"] else None
        engine = admission.engine_message(spec)
        files = None
        if spec.files:
            files = {
                "inputs": [
                    {"path": f["path"], "sha256": f["sha256"],
                     "b64": self._encoded.get(f["sha256"]) or ""}
                    for f in self.store.job_files(job["parent"] or job_id, "input")
                ]
            }  # fmt: skip
        msg: dict[str, Any] = protocol.assign(
            job_id,
            int(job["attempt"]),
            engine,
            module,
            job["module_sha256"],
            stdin,
            int(job["timeout_s"]),
            int(job["memory_mb"]),
            spec.gas,
            files,
            int(job["cpu_milli"]) / economy.MILLI,
            int(job["gpu"]),
        )
        return msg

    # --- node reports -------------------------------------------------------------
    @_light
    def on_event(self, node_id: str, msg: dict[str, Any]) -> bool:
        """A node says a job is accepted/running. Stale or foreign events change nothing."""
        if msg.get("state") == protocol.REJECTED:
            job = self.store.job(str(msg.get("job_id")))
            if job is None or job["node"] != node_id or job["attempt"] != msg.get("attempt"):
                return False
            why = f"node {node_id} turned it down ({msg.get('detail') or 'no reason'})"
            with self.db.transaction():
                if job["state"] not in LIVE[1:] or not self.attempts.end(
                    job["id"], int(job["attempt"]), "declined", self.clock(), error=why
                ):
                    return False
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
                (self.clock(), msg.get("job_id"), node_id, msg.get("attempt")),
            )
            return cur.rowcount == 1

    @_light
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
        try:
            outputs = self._outputs(job, msg.get("outputs"))
        except ValueError as e:
            return f"dropped: result outputs: {e}"
        now = self.clock()
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
        if outputs is not None:
            result["outputs"] = outputs
        error = msg.get("error")
        kind = verification.error_kind(error)
        if job["kind"] == "service" and (msg["state"] == protocol.COMPLETED or kind == "timeout"):
            # A service that ends, or reaches the end of its lifetime, pays for the part of
            # the current period it ran; earlier periods were paid as they ended.
            self.billing.settle(job, node, wall_ms, result, now)
            return "settled"
        if msg["state"] == protocol.COMPLETED and job["parent"] is not None:
            self.replicas.record(job, wall_ms, result, int(msg["exit_code"]), str(msg["digest"]))
            return "replica recorded"
        if msg["state"] == protocol.COMPLETED:
            self._settle(job, node, wall_ms, result)
            return "settled"
        error = str(error or "failed")
        if verification.node_caused(error):  # the node's fault: another node may do better
            why = f"node {node_id} could not run it ({error})"
            lost = self.node_failed(job, why, error=error, wall_ms=wall_ms, result=result)
            return lost or "ignored: attempt already ended"
        self._fail(job, error, result)
        return "refunded" if job["parent"] is None else "replica failed"

    def _outputs(self, job: sqlite3.Row, outputs: Any) -> list[dict[str, Any]] | None:
        """Check and store the files a result brings back ([{path, size, sha256, b64}]):
        each is a blob, listed in job_files under this job. Returns them without their bytes
        for the result; ValueError (the result is dropped) when one is not what it says."""
        if outputs is None:
            return None
        if job["files_bytes"] is None:
            raise ValueError("the job is not a file job")
        total, seen, out, blobs = 0, set(), [], []
        for f in outputs:
            path = f["path"]
            problem = jobfiles.check_path(path)
            if problem or path in seen:
                raise ValueError(problem or f"{path!r} is listed twice")
            seen.add(path)
            try:
                data = base64.b64decode(f["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"{path} is not base64") from None
            if len(data) != f["size"] or hashlib.sha256(data).hexdigest() != f["sha256"]:
                raise ValueError(f"{path}: its bytes are not the size and sha256 it says")
            total += len(data)
            if total > protocol.MAX_OUTPUT_BYTES:
                raise ValueError(f"over the protocol's {protocol.MAX_OUTPUT_BYTES} bytes")
            blobs.append(data)
            out.append({"path": path, "size": len(data), "sha256": f["sha256"]})
        for data in blobs:
            self.store.put_blob(data)
        with self.db.transaction() as c:
            c.execute("DELETE FROM job_files WHERE job = ? AND role = 'output'", (job["id"],))
            c.executemany(
                "INSERT INTO job_files (job, role, path, sha256, size)"
                " VALUES (?, 'output', ?, ?, ?)",
                [(job["id"], f["path"], f["sha256"], f["size"]) for f in out],
            )
        return out

    def _settle(
        self, job: sqlite3.Row, node: sqlite3.Row, wall_ms: int, result: dict[str, Any]
    ) -> None:
        timeout = int(job["timeout_s"])
        cpu, gpus = int(job["cpu_milli"]), int(job["gpu"])
        pay = economy.node_pay(cpu, wall_ms, timeout, gpus=gpus)
        charge = economy.job_charge(cpu, wall_ms, timeout, job["priority"], gpus=gpus)
        payouts = [(wallet_of(node["owner"]), pay)]
        if charge > pay:
            payouts.append((REVENUE, charge - pay))
        payouts = [(a, n) for a, n in payouts if n > 0]
        now = self.clock()
        # The node's `running` event may not have been handled (yet): with hub replicas the
        # event and the result can reach two replicas and be handled in either order. The
        # job then started when the node's wall time says, not before it was assigned.
        assigned = float(job["assigned_at"] or now)
        started = min(now, max(assigned, now - wall_ms / 1000))
        with contextlib.suppress(Stale), self.db.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET state = 'completed', cost = ?, result = ?, finished_at = ?,"
                " started_at = COALESCE(started_at, ?), reason = NULL"
                " WHERE id = ? AND state IN ('assigned', 'running')",
                (charge, json.dumps(result), now, started, job["id"]),
            )
            self.attempts.end_moved(
                cur, job, "completed", now, charge=charge, pay=pay, wall_ms=wall_ms
            )
            self.ledger.close_hold(
                job["id"],
                payouts,
                reason="job completed " + job["id"],
                memo={"attempt": int(job["attempt"])},
            )
            # What it earned and the reputation it gained: one statement on the hot path.
            rep, weight = reputation.assignment("completed")
            c.execute(
                f"UPDATE nodes SET earned = earned + ?, {rep} WHERE id = ?",
                (pay, weight, node["id"]),
            )
            self.bonuses.proved(node, job["owner"])

    # --- failure, loss, retry, cancel -------------------------------------------------------
    def _fail(
        self,
        job: sqlite3.Row,
        reason: str,
        result: dict[str, Any] | None,
        outcome: str = "failed",
        **how: Any,
    ) -> None:
        """The job failed (or is given up on): its live attempt ends with `outcome`, and the
        hold comes back, less what `how` charges for the attempts it was blamed on."""
        now = self.clock()
        if job["replicas"] > 1:  # a verified job: its replicas stop with it
            with self.db.transaction():
                self.replicas.end(job, "failed", reason)
            return
        live = job["state"] in LIVE[1:]
        if job["parent"] is not None:  # a replica: no hold of its own; the replicas decide
            with contextlib.suppress(Stale), self.db.transaction() as c:
                cur = c.execute(
                    "UPDATE jobs SET state = 'failed', cost = 0, result = ?, finished_at = ?,"
                    " reason = ?, verdict = 'failed', paid = 0"
                    " WHERE id = ? AND state IN ('queued', 'assigned', 'running')",
                    (json.dumps(result) if result else None, now, reason, job["id"]),
                )
                if live:
                    self.attempts.end_moved(cur, job, outcome, now, **{"error": reason, **how})
                elif cur.rowcount != 1:
                    raise Stale
                self.replicas.decide(str(job["parent"]))
            return
        with contextlib.suppress(Stale), self.db.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET state = 'failed', cost = COALESCE(cost, 0), result = ?,"
                " finished_at = ?,"
                " reason = ? WHERE id = ? AND state NOT IN ('completed', 'failed', 'cancelled')",
                (json.dumps(result) if result else None, now, reason, job["id"]),
            )
            if live:
                self.attempts.end_moved(cur, job, outcome, now, **{"error": reason, **how})
            elif cur.rowcount != 1:
                raise Stale
            # A service's hours already paid stay paid; the current one comes back.
            self.ledger.refund_hold(job["id"], reason="job failed " + job["id"] + ": " + reason)

    def fail(self, job_id: str, reason: str) -> None:
        job = self.store.job(job_id)
        if job is not None:
            self._fail(job, reason, None)

    def node_failed(
        self,
        job: sqlite3.Row,
        why: str,
        error: str | None = None,
        wall_ms: int | None = None,
        result: dict[str, Any] | None = None,
    ) -> str | None:
        """The node lost this attempt of the job (offline, restarted, silent past the timeout,
        or its executor broke): not the job's fault. The node's reputation drops, and the job
        goes back to the queue for another node, until `max_attempts` attempts were lost;
        then it fails and its hold is refunded. Nobody was paid for a lost attempt, so the hold
        covers every retry.

        Unless the job is what breaks them: when its executor broke (`error`) the same way on
        another node's attempt before, the job is blamed, not the nodes (see `_blame`).
        Returns what happened, or None when the attempt had already ended (a replay)."""
        row = self.store.job(job["id"])
        if row is None or row["attempt"] != job["attempt"] or row["state"] not in LIVE[1:]:
            return None
        now = self.clock()
        if error is not None:
            before = [
                a
                for a in self.attempts.of_job(str(row["id"]))
                if a["outcome"] == "lost" and a["error"] == error and a["node"] != row["node"]
            ]
            if before:
                return self._blame(row, before[0], why, error, wall_ms or 0, result)
        tries = json.loads(row["tries"] or "[]")
        tries.append({"attempt": row["attempt"], "node": row["node"], "outcome": why, "at": now})
        lost = int(row["failures"]) + 1
        with contextlib.suppress(Stale), self.db.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET failures = ?, tries = ? WHERE id = ? AND attempt = ?"
                " AND state IN ('assigned', 'running')",
                (lost, json.dumps(tries), row["id"], row["attempt"]),
            )
            if lost >= self.max_attempts:
                if cur.rowcount != 1:
                    raise Stale
                why = f"{lost} attempts lost by their nodes, the last: {why}"
                self._fail(row, why, None, "lost", wall_ms=wall_ms, error=error)
                outcome = "failed: attempts lost"
            else:
                self.attempts.end_moved(cur, row, "lost", now, wall_ms=wall_ms, error=error)
                self.requeue(
                    row,
                    f"{why}; retrying on another node"
                    f" (attempt {lost + 1} of at most {self.max_attempts})",
                )
                outcome = "retrying: node error"
            if row["node"] is not None:
                reputation.record(c, str(row["node"]), "lost")
            return outcome
        return None

    def _blame(
        self,
        job: sqlite3.Row,
        earlier: sqlite3.Row,
        why: str,
        error: str,
        wall_ms: int,
        result: dict[str, Any] | None,
    ) -> str | None:
        """Two nodes broke the same way on this job: the job breaks them, not they it. It
        fails; the submitter pays for the time both attempts used and their nodes' owners are
        paid for it, as for any run; the earlier node gets back the reputation it lost, and
        the earlier attempt is re-judged from lost to blamed (once: only a lost attempt can
        be)."""
        now = self.clock()
        cpu, timeout, prio = int(job["cpu_milli"]), int(job["timeout_s"]), job["priority"]
        billed = job["kind"] != "service" and job["parent"] is None
        # (node, its owner, pay, charge) of the earlier run and this one; a run whose node is
        # gone (or of a job billed otherwise) moves nothing
        runs: list[tuple[str, str, int, int]] = []
        for node_id, ms in (
            (earlier["node"], int(earlier["wall_ms"] or 0)),
            (job["node"], wall_ms),
        ):
            node = self.store.node(str(node_id)) if billed and node_id else None
            if node is None:
                runs.append((str(node_id), "", 0, 0))
            else:
                pay, charge = (
                    economy.node_pay(cpu, ms, timeout, gpus=int(job["gpu"])),
                    economy.job_charge(cpu, ms, timeout, prio, gpus=int(job["gpu"])),
                )
                runs.append((str(node_id), str(node["owner"]), pay, charge))
        reason = (
            f"{error} (on nodes {earlier['node']} and {job['node']}: the job breaks the executor"
            " it runs in, so it was not retried again)"
        )
        with contextlib.suppress(Stale), self.db.transaction() as c:
            again = c.execute(
                "UPDATE attempts SET outcome = 'blamed' WHERE job = ? AND attempt = ?"
                " AND outcome = 'lost'",
                (job["id"], earlier["attempt"]),
            )
            if again.rowcount != 1:
                raise Stale
            if not billed:
                self._fail(job, reason, result, "blamed", wall_ms=wall_ms)
            else:
                (_, _, pay0, charge0), (_, _, pay1, charge1) = runs
                cur = c.execute(
                    "UPDATE jobs SET state = 'failed', cost = ?, result = ?, finished_at = ?,"
                    " reason = ? WHERE id = ? AND attempt = ? AND state IN ('assigned', 'running')",
                    (charge0 + charge1, json.dumps(result) if result else None, now, reason,
                     job["id"], job["attempt"]),
                )  # fmt: skip
                how = {"charge": charge1, "pay": pay1, "wall_ms": wall_ms, "error": error}
                self.attempts.end_moved(cur, job, "blamed", now, **how)
                self.attempts.add(str(job["id"]), int(earlier["attempt"]), charge0, pay0)
                payouts: dict[str, int] = {}
                for node_id, owner, pay, charge in runs:
                    if pay:
                        payouts[wallet_of(owner)] = payouts.get(wallet_of(owner), 0) + pay
                        c.execute(
                            "UPDATE nodes SET earned = earned + ? WHERE id = ?", (pay, node_id)
                        )
                    payouts[REVENUE] = payouts.get(REVENUE, 0) + charge - pay
                self.ledger.close_hold(
                    job["id"],
                    [(a, n) for a, n in payouts.items() if n > 0],
                    reason=f"job {job['id']} failed, blamed on the job: {error}",
                    memo={"attempts": [int(earlier["attempt"]), int(job["attempt"])]},
                )
            if earlier["node"] is not None:
                reputation.clear_loss(c, str(earlier["node"]))
            return "failed: blamed on the job"
        return None

    def requeue(self, job: sqlite3.Row, reason: str) -> bool:
        """Put an assigned job back in the queue (its node went away); the hold stays. Its
        time in the queue starts again now."""
        with self.db.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET state = 'queued', node = NULL, reason = ?, assigned_at = NULL,"
                " started_at = NULL, period_start = NULL, queued_at = ?"
                " WHERE id = ? AND attempt = ? AND state IN ('assigned', 'running')",
                (reason, self.clock(), job["id"], job["attempt"]),
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
        live = job["state"] in LIVE[1:]
        node = job["node"] if live else None
        now = self.clock()
        with contextlib.suppress(Stale), self.db.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET state = 'cancelled', cost = COALESCE(cost, 0), finished_at = ?,"
                " reason = 'cancelled by its owner'"
                " WHERE id = ? AND state IN ('queued', 'assigned', 'running')",
                (now, job_id),
            )
            if cur.rowcount != 1:
                node = None
                raise Stale
            if job["kind"] == "service" and job["period_start"] is not None and node:
                # The service ran until now: its current period is paid up to this second.
                ran_ms = int((now - float(job["period_start"])) * 1000)
                self.billing.close(job, node, ran_ms, "cancelled by its owner", "cancelled")
            else:
                if live:
                    self.attempts.end_moved(True, job, "cancelled", now)
                self.ledger.refund_hold(job_id, reason="job cancelled " + job_id)
        row = self.store.job(job_id)
        assert row is not None
        return row, node

    # --- views ----------------------------------------------------------------------
    def view(self, job: sqlite3.Row) -> dict[str, Any]:
        """The job as the API and the pages show it (hub/market/job_view.py)."""
        return job_view.view(self, job)
