"""What each item of the bridge's inbox does to the market.

A node's hello, heartbeat, status, event or result, and an agent's submission (its service
calls go to hub/agents/calls.py); the scheduler's tick (liveness sweep, service billing, expiry
of agent calls); a scheduling pass; and the assignments sent again after a restart or when a
node is idle without its job. Whatever arrives is checked: malformed, oversized or foreign
messages are logged and dropped, never fatal.

No paho and no transactions here: the bridge (bridge.py) calls in inside its batch, each item
in a savepoint, and what this decides goes out through the callbacks it gives (`publish`,
`changed`, `dispatch`, `drop`), which hold it back until the batch has committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from edge.core import protocol
from hub.agents.registry import Agents
from hub.ledger import economy
from hub.ledger.money import InsufficientFunds, format_micro
from hub.market.errors import JobConflict, JobError
from hub.market.jobs import Jobs
from hub.market.matching import same_offer
from hub.market.scheduler import Scheduler
from hub.market.spec import JobSpec, error_field
from hub.mqtt import wire
from hub.store.rows import Store

log = logging.getLogger("hub.mqtt.bridge")  # the bridge's log lines (docs/operations.md)

SIZE_LIMITS = {
    protocol.HELLO: protocol.MAX_HEARTBEAT,
    protocol.HEARTBEAT: protocol.MAX_HEARTBEAT,
    protocol.STATUS: protocol.MAX_HEARTBEAT,
    protocol.EVENT: protocol.MAX_EVENT,
    protocol.RESULT: protocol.MAX_RESULT,
    protocol.SUBMIT: protocol.MAX_SUBMIT,
    protocol.INVOKE: protocol.MAX_CALL,
    protocol.RESPONSE: protocol.MAX_CALL,
}


class Messages:
    """The market's side of the bridge: given the store, jobs, scheduler and agents, and the
    bridge's callbacks to publish a message, report a change, ask for a scheduling pass and
    drop a message (counted, logged; returns the outcome)."""

    def __init__(
        self,
        store: Store,
        jobs: Jobs,
        scheduler: Scheduler,
        agents: Agents | None,
        *,
        publish: Callable[[str, dict[str, Any]], None],
        changed: Callable[[str, dict[str, Any]], None],
        dispatch: Callable[[], None],
        drop: Callable[[str, str], str],
    ) -> None:
        self.store = store
        self.jobs = jobs
        self.scheduler = scheduler
        self.agents = agents  # service calls between agents (hub/agents/calls.py)
        self.publish = publish
        self._changed = changed
        self.dispatch = dispatch
        self._drop = drop
        self._resent: dict[str, float] = {}  # job id -> when its assignment was last re-sent
        # Fetches a spec's https:// inputs (hub/api/jobs.py's fetch_inputs; the app sets it):
        # a submit that names URLs is answered once they are fetched, off the batch.
        self.fetch_inputs: Callable[[JobSpec], Awaitable[JobSpec]] | None = None
        self.requeue: Callable[[str, bytes], None] | None = None  # back into the inbox
        self._fetching: set[asyncio.Task[None]] = set()
        # Counted by the app's metrics (hub/api/metrics.py): each heartbeat, and each result
        # with what it did and the job's row after it.
        # Replicas (hub/cluster/leader.py): only the leader schedules and ticks; another asks
        # it for a pass instead.
        self.leading: Callable[[], bool] = lambda: True
        self.ask_leader: Callable[[], None] = lambda: None
        self._led = True  # whether the last pass asked found this replica leading
        self.heard: Callable[[], None] = lambda: None
        self.settled: Callable[[str, Any], None] = lambda _outcome, _job: None

    # --- what goes to the nodes ------------------------------------------------------------
    def schedule(self) -> int:
        """One scheduling pass; its assignments go out (QoS 1) after the batch commits. A
        replica that does not lead asks the leader instead."""
        if not self.leading():
            self.ask_leader()
            self._led = False
            return 0
        if not self._led:  # leading again: others scheduled meanwhile, trust nothing kept
            self.scheduler.forget()
            self._led = True
        assignments = self.scheduler.schedule(wake=self._pass_soon)
        if self.scheduler.more:  # a plan left to commit, a slice a pass
            self._pass_soon()
        for a in assignments:
            self.publish(protocol.node_topic(a.node_id, protocol.ASSIGN), a.message)
            job_id = a.message["job_id"]
            log.info(
                "job %s -> node %s", job_id, a.node_id, extra={"job": job_id, "node": a.node_id}
            )
            self._changed("job", {"id": a.message["job_id"], "state": "assigned"})
        return len(assignments)

    def _pass_soon(self) -> None:
        """Ask for another pass once this batch is done (a pass asked for from inside the
        pass itself would be forgotten at the end of it)."""
        with contextlib.suppress(RuntimeError):  # no loop: the caller sees scheduler.more
            asyncio.get_running_loop().call_soon(self.dispatch)

    def resend_assignments(self) -> int:
        """After a hub restart: assignments made but maybe never sent go out again; nodes
        ignore ones they are running (same job id and attempt) and re-send finished results."""
        n = 0
        for job in self.store.active_jobs():
            # Running ones too: a result sent while the hub was down was lost with its clean
            # session; the node answers a re-sent assignment from its result cache.
            msg = self.jobs.assign_message(job["id"])
            self.publish(protocol.node_topic(job["node"], protocol.ASSIGN), msg)
            self._resent[job["id"]] = time.time()
            n += 1
        return n

    def cancel_on_node(self, node_id: str, job_id: str, attempt: int) -> None:
        self.publish(
            protocol.node_topic(node_id, protocol.CANCEL), protocol.cancel(job_id, attempt)
        )

    # --- the scheduler's tick --------------------------------------------------------------
    def tick_steps(self, now: float) -> list[tuple[str, Callable[[], object]]]:
        """The tick's steps at `now`, named for the log; the bridge runs each in a savepoint
        of its own. None on a replica that does not lead."""
        if not self.leading():
            return []
        steps: list[tuple[str, Callable[[], object]]] = [
            ("the liveness sweep", lambda: self._sweep(now)),
            ("service billing", lambda: self._bill(now)),
        ]
        if self.jobs.retention.due(now):  # job files past retention, unreferenced blobs
            steps.append(("the retention of job files", lambda: self.jobs.retention.run(now)))
        agents = self.agents
        if agents is not None:  # calls past their deadline are refunded
            steps.append(("the expiry of agent calls", lambda: agents.tick(now)))
        return steps

    def _sweep(self, now: float) -> None:
        for node_id in self.scheduler.sweep(now=now):
            self._changed("node", {"id": node_id, "state": protocol.OFFLINE})

    def _bill(self, now: float) -> None:
        for node_id, job_id, attempt in self.jobs.bill_services(now=now):
            log.info(
                "service job %s stopped: its owner cannot pay on",
                job_id,
                extra={"job": job_id, "node": node_id},
            )
            self.cancel_on_node(node_id, job_id, attempt)
            self._changed("job", {"id": job_id, "state": "cancelled"})
            if self.agents is not None:
                self.agents.service_stopped(job_id)

    # --- messages from nodes and agents ----------------------------------------------------
    def handle(self, topic: str, payload: bytes | bytearray) -> str:
        """Process one message; returns what happened (for logs and tests)."""
        parsed = protocol.parse_topic(topic)
        if parsed is None:
            return self._drop(topic, "not a DEparrow topic")
        space, ident, kind = parsed
        limit = SIZE_LIMITS.get(kind)
        if limit is None or (space == "nodes" and kind not in wire.NODE_TYPES):
            return self._drop(topic, f"unknown message kind {kind!r}")
        if len(payload) > limit:
            return self._drop(topic, f"{len(payload)} bytes is over the {limit}-byte limit")
        if space == "agents":
            if kind not in (protocol.SUBMIT, protocol.INVOKE, protocol.RESPONSE):
                return self._drop(topic, "agents may only publish submit, invoke and response")
            problem = wire.json_problem(payload)
            if problem is not None:
                return self._refuse_unreadable(topic, ident, kind, payload, problem)
            if kind != protocol.SUBMIT:
                if self.agents is None:
                    return self._drop(topic, "this hub takes no service calls")
                return self.agents.handle(ident, kind, payload)
            return self._on_submit(topic, ident, payload)
        if not payload and kind == protocol.STATUS:
            return "ignored: retained status cleared"
        try:
            msg = msgspec.json.decode(payload, type=wire.NODE_TYPES[kind])
        except msgspec.DecodeError as e:
            return self._drop(topic, f"malformed {kind}: {e}")
        except RecursionError:  # unknown fields are skipped, recursively
            return self._drop(topic, f"malformed {kind}: it nests too deep")
        if msg.v != protocol.VERSION:  # type: ignore[attr-defined]
            return self._drop(topic, f"protocol version {msg.v} is not {protocol.VERSION}")  # type: ignore[attr-defined]
        if msg.node_id != ident:  # type: ignore[attr-defined]
            return self._drop(topic, "node_id in payload does not match the topic")
        node = self.store.node(ident)
        if node is None:
            return self._drop(topic, f"unknown node {ident}")
        if node["revoked_at"] is not None:  # an outside broker may still let it speak
            return self._drop(topic, f"node {ident} was removed by its owner")
        now = self.jobs.clock()
        if isinstance(msg, wire.Hello):
            self.store.update_node(
                ident,
                state=protocol.IDLE,
                last_seen=now,
                engines=json.dumps(msg.engines),
                resources=msgspec.json.encode(msg.resources).decode(),
                allow_network=json.dumps(msg.allow_network),
                files=msgspec.json.encode(msg.files).decode() if msg.files else None,
                slots=msg.slots,
                gpus=msgspec.json.encode(msg.gpus).decode() if msg.gpus else None,
                max_message=msg.max_message,
                last_seq=-1,  # a new session: its heartbeats count from the start again
            )
            for job in self.store.jobs_on_node(ident):
                if job["id"] not in msg.running:
                    self.jobs.node_failed(job, f"node {ident} restarted without it")
            self._changed("node", {"id": ident, "state": protocol.IDLE})
            self.dispatch()
            return "hello"
        if isinstance(msg, wire.Heartbeat):
            if msg.seq < int(node["last_seq"]):
                # Sent before the last beat handled: hub replicas share a node's messages and
                # may handle two beats in either order. The older one would undo the newer
                # (a `busy` after the `idle` that followed it keeps the node from new work).
                return "ignored: an older heartbeat than the last"
            resources = msgspec.json.encode(msg.resources).decode()
            network, suspended = json.dumps(msg.allow_network), _suspended(msg, now)
            before = self.scheduler.changes()
            # Availability since the previous beat (suspended time and gaps don't pay), credited
            # in the statement that moves the last_seen it was measured from: no beat can be
            # paid twice.
            gap = 0
            if node["last_seen"]:
                gap = economy.counted_gap_ms(
                    int((now - float(node["last_seen"])) * 1000),
                    int(self.scheduler.offline_after_s() * 1000),
                )
            overdue = self.jobs.bonuses.beat(
                ident,
                str(node["state"]),
                gap,
                now,
                {
                    "state": msg.state,
                    "last_seen": now,
                    "resources": resources,
                    "running": json.dumps(msg.running),
                    "last_seq": msg.seq,
                    "allow_network": network,
                    "free": msgspec.json.encode(msg.free).decode() if msg.free else None,
                    "suspended": suspended,
                },
                stale_before=now - self._resend_grace(),
            )
            if same_offer(node, msg.state, resources, network, suspended):
                self.scheduler.unimportant(before)  # no pass need look at the store again
            elif {msg.state, node["state"]} <= _IDLE_OR_BUSY and same_offer(
                node, node["state"], resources, network, suspended
            ):
                self.scheduler.light(before)  # a node freed up or filled: the queue's head
            if msg.state == protocol.IDLE and overdue:
                self._redeliver_lost(ident, msg.running, now)
            res = msg.resources
            self._changed("beat", {"id": ident, "t": now, "state": msg.state, "load": res.load,
                                   "cpu": res.cpu, "memory_mb": res.memory_mb,
                                   "running": len(msg.running)})  # fmt: skip
            if node["state"] != msg.state:
                self._changed("node", {"id": ident, "state": msg.state})
            if msg.state == protocol.IDLE:
                self.dispatch()
            self.heard()
            return "heartbeat"
        if isinstance(msg, wire.Status):
            if msg.state == protocol.OFFLINE:
                self.scheduler.node_offline(ident, "it said goodbye or its connection dropped")
                self._changed("node", {"id": ident, "state": protocol.OFFLINE})
            else:
                before = self.scheduler.changes()
                self.store.update_node(ident, last_seen=now)
                self.scheduler.unimportant(before)  # last_seen: no plan reads it
            return "status " + msg.state
        if isinstance(msg, wire.Event):
            changed = self.jobs.on_event(ident, msgspec.structs.asdict(msg))
            if changed:
                self._changed("job", {"id": msg.job_id, "state": "running"})
            return "event" if changed else "ignored: stale event"
        if isinstance(msg, wire.Result):
            fields = msgspec.structs.asdict(msg)
            if msg.outputs is not None:  # asdict is shallow: the files as dicts too
                fields["outputs"] = [msgspec.structs.asdict(f) for f in msg.outputs]
            outcome = self.jobs.on_result(ident, fields)
            if outcome.startswith("dropped"):
                return self._drop(topic, outcome[len("dropped: ") :])
            settled = self.store.job(msg.job_id)
            if settled is not None:
                self._changed("job", {"id": msg.job_id, "state": settled["state"]})
            self.settled(outcome, settled)
            log.info(
                "result for %s from %s: %s",
                msg.job_id,
                ident,
                outcome,
                extra={"job": msg.job_id, "node": ident},
            )
            self.dispatch()
            return outcome
        return self._drop(topic, "unhandled")

    def _resend_grace(self) -> float:
        """How long an idle node may go without listing a job given to it before the hub
        sends that assignment again (and between two such re-sends)."""
        return 3 * self.scheduler.config.heartbeat_interval_s

    def _redeliver_lost(self, node_id: str, running: list[str], now: float) -> None:
        """An idle node that does not list a job the hub gave it a while ago either never got
        the assignment or finished it and its result was lost. Sending the same assignment
        again (same attempt) settles both: the node runs it, or answers from its result cache.
        Rate-limited per job, so a slow network sees one re-send per grace period."""
        grace = self._resend_grace()
        for job in self.store.jobs_on_node(node_id):
            if job["id"] in running or now - float(job["assigned_at"] or now) < grace:
                continue
            if now - self._resent.get(job["id"], 0.0) < grace:
                continue
            self._resent[job["id"]] = now
            log.warning(
                "job %s: node %s is idle without it; sending it again",
                job["id"],
                node_id,
                extra={"job": job["id"], "node": node_id},
            )
            self.publish(protocol.node_topic(node_id, protocol.ASSIGN),
                         self.jobs.assign_message(job["id"]))  # fmt: skip
        if len(self._resent) > 10_000:
            self._resent.clear()

    def _fetch_then_submit(
        self,
        topic: str,
        req: wire.Submit,
        spec: JobSpec,
        answer: Callable[[bool, dict[str, Any]], str],
    ) -> None:
        """Fetch the URLs of a submit's inputs off the batch, then put the submit back in the
        inbox with `sha256:` references in their place (it is handled as any other), or
        answer the error."""
        fetch, requeue = self.fetch_inputs, self.requeue
        assert fetch is not None and requeue is not None

        async def fetch_and_requeue() -> None:
            try:
                fetched = await fetch(spec)
            except JobError as e:
                answer(False, {"error": str(e), "field": e.field, "status": 400})
                return
            again = {"v": req.v, "request_id": req.request_id, "token": req.token,
                     "spec": msgspec.to_builtins(fetched)}  # fmt: skip
            requeue(topic, msgspec.json.encode(again))

        task = asyncio.get_running_loop().create_task(fetch_and_requeue())
        self._fetching.add(task)
        task.add_done_callback(self._fetching.discard)

    def _refuse_unreadable(
        self, topic: str, agent_id: str, kind: str, payload: bytes | bytearray, problem: str
    ) -> str:
        """An agent's message that no decoder should read (nested too deep, a key twice):
        a submit or invoke is answered on the agent's own reply topic, when its request_id
        can be read; anything else is dropped."""
        request_id = wire.top_level_string(payload, "request_id")
        if kind == protocol.RESPONSE or not request_id or len(request_id) > 128:
            return self._drop(topic, f"{kind} {problem}")
        body = {"error": f"{kind} {problem}", "status": 400}
        self.publish(protocol.agent_topic(agent_id, protocol.REPLY),
                     protocol.reply(request_id, False, body))  # fmt: skip
        return f"{kind} rejected: {problem}"

    def _on_submit(self, topic: str, agent_id: str, payload: bytes | bytearray) -> str:
        try:
            req = msgspec.json.decode(payload, type=wire.Submit)
        except msgspec.DecodeError as e:
            return self._drop(topic, f"malformed submit: {e}")
        reply_topic = protocol.agent_topic(agent_id, protocol.REPLY)

        def answer(ok: bool, body: dict[str, Any]) -> str:
            self.publish(reply_topic, protocol.reply(req.request_id, ok, body))
            return "submit " + ("accepted" if ok else "rejected: " + str(body.get("error")))

        if req.v != protocol.VERSION:
            return answer(False, {"error": f"protocol version {req.v} is not supported: this"
                                  f" hub speaks version {protocol.VERSION} (docs/protocol.md)",
                                  "field": "v", "status": 400})  # fmt: skip
        user = self.store.user_by_token(req.token)
        if user is None or user["id"] != agent_id:
            return answer(False, {"error": "token does not belong to this agent", "status": 401})
        try:
            spec = msgspec.convert(req.spec, type=JobSpec)
        except msgspec.ValidationError as e:
            return answer(
                False,
                {"error": f"invalid job spec: {e}", "field": error_field(str(e)), "status": 400},
            )
        if self.fetch_inputs is not None and any(
            f.ref.startswith(("https:", "http:")) for f in spec.inputs
        ):
            self._fetch_then_submit(topic, req, spec, answer)
            return "submit: fetching its inputs"
        try:
            # In a savepoint of its own: a refused submit leaves nothing behind (the blobs of
            # its inline module and files included), as a refused REST submit does.
            with self.store.db.transaction():
                job = self.jobs.submit(agent_id, spec, submit_key="mqtt:" + req.request_id)
        except InsufficientFunds as e:
            return answer(
                False, {"error": str(e), "shortfall": format_micro(e.shortfall), "status": 402}
            )
        except JobConflict as e:
            return answer(False, {"error": str(e), "status": 409})
        except JobError as e:
            return answer(False, {"error": str(e), "field": e.field, "status": 400})
        # It owes this agent its final reply once it ends (finals.py); a retried submit of the
        # same request_id finds it marked already.
        self.store.reply_over_mqtt(job["id"], req.request_id)
        self._changed("job", {"id": job["id"], "state": job["state"]})
        self.dispatch()
        return answer(
            True, {"id": job["id"], "state": job["state"], "hold": format_micro(int(job["hold"]))}
        )


_IDLE_OR_BUSY = {protocol.IDLE, protocol.BUSY}


def _suspended(beat: wire.Heartbeat, now: float) -> str | None:
    """What a suspended node said of it, as stored: why, and when (hub time) it may run jobs
    again at the earliest; None while it is not suspended."""
    if beat.state != protocol.SUSPENDED or beat.suspended is None:
        return None
    s = beat.suspended
    at = None if s.resume_in_s is None else now + s.resume_in_s
    return json.dumps({"why": s.why, "resume_at": at})
