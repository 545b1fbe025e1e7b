"""The agent registry: agents, the services they sell, and paid calls between them.

An agent is a user with the role `agent` (its own wallet and API token), usually created by a
person who owns it and funds it. It registers services (name, description, tags, a price per
call, JSON Schemas for input and output) that anyone can find by text or tag, and answers
calls over MQTT. A call goes through the hub:

1. the caller asks (REST with an Idempotency-Key, or MQTT `invoke` with a request id); the
   input is checked against the service's input schema and the price is moved from the
   caller's wallet into a hold for the call, in one transaction with the call's row;
2. the hub publishes the call on the serving agent's `call` topic;
3. the agent's `response` settles it, once: a valid output pays the price to the agent; an
   error, an output that breaks the output schema, or no answer by the deadline refunds the
   caller. The call row's state guards every step (`pending` -> one final state), so a
   duplicate or late response, or one from another agent, moves nothing.

Deadlines live in the database: the bridge's tick and the hub's start expire overdue calls,
so a call never stays held across a hub restart. No aiohttp and no paho here: the API layer
and the bridge call in, and messages go out through the `publish` function the app attaches
(the bridge's, which waits for the batch's COMMIT when called inside one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Annotated, Any

import jsonschema
import msgspec
from jsonschema.exceptions import SchemaError, best_match

from edge.core import protocol
from hub.ledger.ledger import (
    InsufficientFunds,
    Ledger,
    LedgerError,
    UnknownAccount,
    credits_to_micro,
    format_micro,
    wallet_id,
)
from hub.store.db import Database
from hub.store.rows import Store, new_id

log = logging.getLogger(__name__)

COMPONENT = "agents"
DEFAULT_CALL_TIMEOUT_S = 30.0  # a service's default; a call may ask for less or more
MAX_CALL_TIMEOUT_S = 300.0
MAX_PRICE_CREDITS = 1_000_000
MAX_SCHEMA_BYTES = 64 * 1024
MAX_TAGS = 16
CALL_STATES = ("pending", "completed", "failed", "timeout")

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "agents, services, calls, notices",
        """
        CREATE TABLE agents (
            id TEXT PRIMARY KEY REFERENCES users(id),
            owner TEXT REFERENCES users(id),
            created_at REAL NOT NULL
        );
        CREATE INDEX agents_owner ON agents(owner);
        CREATE TABLE services (
            id TEXT PRIMARY KEY,
            agent TEXT NOT NULL REFERENCES users(id),
            name TEXT NOT NULL,
            description TEXT NOT NULL,
            tags TEXT NOT NULL,
            price INTEGER NOT NULL CHECK (price >= 0),
            input_schema TEXT NOT NULL,
            output_schema TEXT NOT NULL,
            timeout_s REAL NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            retired_at REAL,
            UNIQUE (agent, name)
        );
        CREATE TABLE calls (
            id TEXT PRIMARY KEY,
            service TEXT NOT NULL REFERENCES services(id),
            service_name TEXT NOT NULL,
            agent TEXT NOT NULL REFERENCES users(id),
            caller TEXT NOT NULL REFERENCES users(id),
            price INTEGER NOT NULL,
            input TEXT NOT NULL,
            output TEXT,
            error TEXT,
            state TEXT NOT NULL CHECK (state IN ('pending', 'completed', 'failed', 'timeout')),
            created_at REAL NOT NULL,
            deadline REAL NOT NULL,
            finished_at REAL,
            idem_key TEXT UNIQUE,
            request_id TEXT
        );
        CREATE INDEX calls_pending ON calls(state, deadline);
        CREATE INDEX calls_caller ON calls(caller, created_at);
        CREATE INDEX calls_agent ON calls(agent, created_at);
        CREATE TABLE agent_notices (
            id INTEGER PRIMARY KEY,
            agent TEXT NOT NULL REFERENCES users(id),
            owner TEXT,
            kind TEXT NOT NULL,
            ref TEXT NOT NULL UNIQUE,
            message TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE INDEX agent_notices_agent ON agent_notices(agent, id);
        """,
    ),
]


# --- errors ---------------------------------------------------------------------------------
class AgentError(Exception):
    """A request about agents, services or calls that cannot be honoured; says why."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class AgentNotFound(AgentError):
    pass


class AgentForbidden(AgentError):
    """The caller may not do this (not an agent, not this agent, not its owner)."""


class CallConflict(AgentError):
    """An idempotency key reused for a different call."""


# --- types ----------------------------------------------------------------------------------
Text = Annotated[str, msgspec.Meta(max_length=2000)]
ServiceName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[\w.\-]+$")]
Tag = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[\w.\-]+$")]


class Invoke(msgspec.Struct):
    """A caller agent's `invoke` over MQTT (docs/agents.md)."""

    v: int
    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    token: Annotated[str, msgspec.Meta(min_length=8, max_length=256)]
    service: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    input: Any = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_CALL_TIMEOUT_S)] | None = None


class Response(msgspec.Struct):
    """A serving agent's `response` to a call."""

    v: int
    call_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    token: Annotated[str, msgspec.Meta(min_length=8, max_length=256)]
    ok: bool
    output: Any = None
    error: Annotated[str, msgspec.Meta(max_length=4096)] | None = None


class ServiceView(msgspec.Struct):
    id: str
    agent: str
    agent_name: str
    name: str
    description: str
    tags: list[str]
    price: str  # credits per call, a decimal string
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    timeout_s: float  # how long a call waits for the agent unless it asks otherwise
    created: float
    updated: float


class CallView(msgspec.Struct):
    id: str
    service: str
    service_name: str
    agent: str
    caller: str
    state: str  # pending | completed | failed | timeout
    input: Any
    output: Any
    error: str | None
    price: str  # what the call costs (moved to the agent only when completed)
    paid: str  # what the caller finally paid: the price when completed, else 0
    created: float
    deadline: float
    finished: float | None


# --- JSON Schema ----------------------------------------------------------------------------
def check_schema(schema: object, field: str) -> dict[str, Any]:
    """A JSON Schema object the validator accepts, else AgentError naming the field."""
    if not isinstance(schema, dict):
        raise AgentError(f'{field} must be a JSON Schema object, like {{"type": "object"}}', field)
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise AgentError(f"{field} is over {MAX_SCHEMA_BYTES} bytes", field)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except SchemaError as e:
        raise AgentError(f"{field} is not a valid JSON Schema: {e.message}", field) from None
    return schema


def schema_problem(schema: dict[str, Any], instance: Any) -> str | None:
    """None when instance matches schema; else where and how it does not."""
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = best_match(validator.iter_errors(instance))
    if error is None:
        return None
    where = error.json_path if error.path else "$"
    return f"at {where}: {error.message}"


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")))


class Agents:
    """Registry and call settlement over the hub's Database and Ledger."""

    def __init__(
        self,
        db: Database,
        store: Store,
        ledger: Ledger,
        default_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
    ) -> None:
        if not 0 < default_timeout_s <= MAX_CALL_TIMEOUT_S:
            raise ValueError(f"default_timeout_s must be in (0, {MAX_CALL_TIMEOUT_S}]")
        self.db = db
        self.store = store
        self.ledger = ledger
        self.default_timeout_s = default_timeout_s
        db.migrate(COMPONENT, MIGRATIONS)
        self._publish: Callable[[str, dict[str, Any]], None] | None = None
        self._events: dict[str, asyncio.Event] = {}

    def attach(self, publish: Callable[[str, dict[str, Any]], None] | None) -> None:
        """How messages reach the broker (the bridge's publish), or None when it is gone."""
        self._publish = publish

    def _send(self, topic: str, msg: dict[str, Any]) -> None:
        if self._publish is None:
            log.warning("no MQTT connection: %s not sent (a pending call expires)", topic)
            return
        self._publish(topic, msg)

    # --- agents -------------------------------------------------------------------------
    def create_agent(self, owner: str, name: str, fund: int = 0) -> tuple[str, str]:
        """A new agent owned by `owner`, funded with `fund` µc from the owner's wallet (no
        welcome grant: agents would otherwise mint credits). Returns (agent id, API token).
        InsufficientFunds: nothing is created."""
        with self.db.transaction() as c:
            agent_id, token = self.store.create_user(name, "agent")
            self.ledger.open_account(wallet_id(agent_id), "wallet", agent_id)
            c.execute(
                "INSERT INTO agents (id, owner, created_at) VALUES (?, ?, ?)",
                (agent_id, owner, time.time()),
            )
            if fund > 0:
                self.ledger.transfer(
                    f"fund-agent:{agent_id}",
                    wallet_id(owner),
                    wallet_id(agent_id),
                    fund,
                    f"funds for new agent {name} ({agent_id})",
                )
        return agent_id, token

    def owner_of(self, agent_id: str) -> str | None:
        row = self.db.query_one("SELECT owner FROM agents WHERE id = ?", (agent_id,))
        return str(row["owner"]) if row is not None and row["owner"] else None

    def may_see(self, who: str, is_admin: bool, agent_id: str) -> bool:
        return is_admin or who == agent_id or self.owner_of(agent_id) == who

    def agent_row(self, agent_id: str) -> sqlite3.Row | None:
        return self.db.query_one(
            "SELECT u.id, u.name, u.created_at, a.owner FROM users u"
            " LEFT JOIN agents a ON a.id = u.id WHERE u.id = ? AND u.role = 'agent'",
            (agent_id,),
        )

    def agents(self, viewer: str | None) -> list[sqlite3.Row]:
        """Agents the viewer may see (None: all): itself and the agents it owns."""
        sql = (
            "SELECT u.id, u.name, u.created_at, a.owner FROM users u"
            " LEFT JOIN agents a ON a.id = u.id WHERE u.role = 'agent'"
        )
        if viewer is None:
            return self.db.query(sql + " ORDER BY u.created_at")
        return self.db.query(
            sql + " AND (u.id = ? OR a.owner = ?) ORDER BY u.created_at", (viewer, viewer)
        )

    def agent_view(self, row: sqlite3.Row) -> dict[str, Any]:
        agent_id = str(row["id"])
        wallet = wallet_id(agent_id)
        jobs = self.db.query(
            "SELECT id, name, state, reason, cost, periods_billed FROM jobs"
            " WHERE owner = ? AND kind = 'service' ORDER BY submitted_at DESC LIMIT 20",
            (agent_id,),
        )
        services = self.db.query_one(
            "SELECT count(*) AS n FROM services WHERE agent = ? AND retired_at IS NULL",
            (agent_id,),
        )
        totals = self.db.query_one(
            "SELECT"
            " COALESCE(SUM(CASE WHEN agent = ?1 AND state = 'completed' THEN price END), 0) AS"
            " earned,"
            " COALESCE(SUM(CASE WHEN caller = ?1 AND state = 'completed' THEN price END), 0) AS"
            " spent,"
            " COALESCE(SUM(CASE WHEN agent = ?1 THEN 1 END), 0) AS served,"
            " COALESCE(SUM(CASE WHEN caller = ?1 THEN 1 END), 0) AS made,"
            " COALESCE(SUM(CASE WHEN caller = ?1 AND state = 'pending' THEN 1 END), 0) AS paying"
            " FROM calls WHERE agent = ?1 OR caller = ?1",
            (agent_id,),
        )
        assert services is not None and totals is not None
        notices = self.notices(agent_id, limit=5)
        try:
            balance, held = self.ledger.balance(wallet), self.ledger.held_for(wallet)
        except UnknownAccount:  # an agent whose wallet was never opened holds nothing
            balance = held = 0
        states = [str(j["state"]) for j in jobs]
        if any(s in ("assigned", "running") for s in states):
            state = "running"
        elif "queued" in states or int(totals["paying"]):
            state = "paying"  # credits held: a service waiting for a node, or calls it made
        elif jobs and str(jobs[0]["reason"] or "").startswith("stopped after"):
            state = "stopped"  # its last service job ended because it could not pay on
        else:
            state = "idle"
        return {
            "id": agent_id,
            "name": row["name"],
            "owner": row["owner"],
            "created": row["created_at"],
            "balance": format_micro(balance),
            "held": format_micro(held),
            "services": int(services["n"]),
            "state": state,
            "service_jobs": [
                {
                    "id": j["id"],
                    "name": j["name"],
                    "state": j["state"],
                    "reason": j["reason"],
                    "cost": format_micro(int(j["cost"])) if j["cost"] is not None else None,
                    "periods_billed": j["periods_billed"],
                }
                for j in jobs
            ],
            "calls": {
                "served": int(totals["served"]),
                "made": int(totals["made"]),
                "earned": format_micro(int(totals["earned"])),
                "spent": format_micro(int(totals["spent"])),
            },
            "notices": notices,
        }

    def notices(self, agent_id: str, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.db.query(
            "SELECT kind, ref, message, created_at FROM agent_notices WHERE agent = ?"
            " ORDER BY id DESC LIMIT ?",
            (agent_id, limit),
        )
        return [
            {"kind": r["kind"], "ref": r["ref"], "message": r["message"], "at": r["created_at"]}
            for r in rows
        ]

    # --- services -----------------------------------------------------------------------
    def register(
        self,
        agent_id: str,
        *,
        name: str,
        description: str,
        tags: list[str],
        price: str | int,
        input_schema: object,
        output_schema: object,
        timeout_s: float | None = None,
    ) -> tuple[ServiceView, bool]:
        """Register (or update: same agent, same name) a service. Returns (view, created).
        The caller must already be known to be this agent (the API checks the role)."""
        micro = credits_to_micro(price)  # InvalidAmount for a malformed or too precise price
        if micro < 0 or micro > MAX_PRICE_CREDITS * 1_000_000:
            raise AgentError(
                f"price must be 0 to {MAX_PRICE_CREDITS} credits, not {price}", "price"
            )
        if len(tags) > MAX_TAGS:
            raise AgentError(f"at most {MAX_TAGS} tags", "tags")
        tags = sorted({t.lower() for t in tags})
        ins = check_schema(input_schema, "input_schema")
        outs = check_schema(output_schema, "output_schema")
        timeout = self.default_timeout_s if timeout_s is None else float(timeout_s)
        if not 0 < timeout <= MAX_CALL_TIMEOUT_S:
            raise AgentError(f"timeout_s must be in (0, {MAX_CALL_TIMEOUT_S:g}]", "timeout_s")
        now = time.time()
        with self.db.transaction() as c:
            existing = self.db.query_one(
                "SELECT id FROM services WHERE agent = ? AND name = ?", (agent_id, name)
            )
            fields = (description, json.dumps(tags), micro, json.dumps(ins), json.dumps(outs),
                      timeout, now)  # fmt: skip
            if existing is None:
                service_id = new_id("s")
                c.execute(
                    "INSERT INTO services (description, tags, price, input_schema,"
                    " output_schema, timeout_s, updated_at, id, agent, name, created_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (*fields, service_id, agent_id, name, now),
                )
            else:
                service_id = str(existing["id"])
                c.execute(
                    "UPDATE services SET description = ?, tags = ?, price = ?, input_schema = ?,"
                    " output_schema = ?, timeout_s = ?, updated_at = ?, retired_at = NULL"
                    " WHERE id = ?",
                    (*fields, service_id),
                )
        view = self.service(service_id)
        assert view is not None
        return view, existing is None

    def retire(self, agent_id: str, service_id: str) -> ServiceView:
        """Take a service off the registry (calls already made still settle)."""
        row = self._service_row(service_id)
        if row is None or row["agent"] != agent_id:
            raise AgentNotFound(f"no service {service_id} of agent {agent_id}")
        with self.db.transaction() as c:
            c.execute(
                "UPDATE services SET retired_at = ? WHERE id = ? AND retired_at IS NULL",
                (time.time(), service_id),
            )
        view = self.service(service_id, include_retired=True)
        assert view is not None
        return view

    def _service_row(self, service_id: str) -> sqlite3.Row | None:
        return self.db.query_one(
            "SELECT s.*, u.name AS agent_name FROM services s JOIN users u ON u.id = s.agent"
            " WHERE s.id = ?",
            (service_id,),
        )

    def service(self, service_id: str, include_retired: bool = False) -> ServiceView | None:
        row = self._service_row(service_id)
        if row is None or (row["retired_at"] is not None and not include_retired):
            return None
        return _service_view(row)

    def search(
        self, q: str | None = None, tag: str | None = None, agent: str | None = None,
        limit: int = 100,
    ) -> list[ServiceView]:  # fmt: skip
        """Services whose name, description or tags contain every word of q (any case),
        carrying tag, served by agent; cheapest first."""
        where = ["s.retired_at IS NULL"]
        params: list[Any] = []
        for word in (q or "").lower().split():
            escaped = word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append(
                "(lower(s.name) LIKE ? ESCAPE '\\' OR lower(s.description) LIKE ? ESCAPE '\\'"
                " OR lower(s.tags) LIKE ? ESCAPE '\\')"
            )
            params += [f"%{escaped}%"] * 3
        if tag:
            where.append("EXISTS (SELECT 1 FROM json_each(s.tags) WHERE value = ?)")
            params.append(tag.lower())
        if agent:
            where.append("s.agent = ?")
            params.append(agent)
        rows = self.db.query(
            "SELECT s.*, u.name AS agent_name FROM services s JOIN users u ON u.id = s.agent"
            f" WHERE {' AND '.join(where)} ORDER BY s.price, s.name, s.id LIMIT ?",
            (*params, limit),
        )
        return [_service_view(r) for r in rows]

    # --- calls --------------------------------------------------------------------------
    def call_row(self, call_id: str) -> sqlite3.Row | None:
        return self.db.query_one("SELECT * FROM calls WHERE id = ?", (call_id,))

    def calls(self, agent_id: str, limit: int = 50) -> list[CallView]:
        rows = self.db.query(
            "SELECT * FROM calls WHERE caller = ?1 OR agent = ?1 ORDER BY created_at DESC LIMIT ?2",
            (agent_id, limit),
        )
        return [call_view(r) for r in rows]

    def start_call(
        self,
        caller: str,
        service_id: str,
        input: Any,
        timeout_s: float | None,
        idem_key: str,
        request_id: str | None = None,
    ) -> tuple[sqlite3.Row, bool]:
        """Check, hold the price, record the call. Returns (call row, new); a repeated key
        returns the first call (new=False) and moves nothing. InsufficientFunds: nothing is
        stored. The caller then publishes the call with send_call() if it is new."""
        key = caller + ":" + idem_key  # one key space per caller
        existing = self.db.query_one("SELECT * FROM calls WHERE idem_key = ?", (key,))
        if existing is not None:
            if existing["service"] != service_id or json.loads(existing["input"]) != input:
                raise CallConflict(
                    f"that idempotency key was used for call {existing['id']} with another "
                    "service or input; use a new key for a new call"
                )
            return existing, False
        row = self._service_row(service_id)
        if row is None or row["retired_at"] is not None:
            raise AgentNotFound(
                f"no service {service_id}: find one with GET /api/v1/agents/services?q=..."
            )
        if row["agent"] == caller:
            raise AgentError("an agent cannot call its own service", "service")
        if _json_size(input) > protocol.MAX_CALL - 1024:
            raise AgentError(f"input is over {protocol.MAX_CALL - 1024} bytes of JSON", "input")
        problem = schema_problem(json.loads(row["input_schema"]), input)
        if problem is not None:
            raise AgentError(
                f"input does not match the input schema of service {row['name']}: {problem}",
                "input",
            )
        timeout = float(row["timeout_s"]) if timeout_s is None else float(timeout_s)
        if not 0 < timeout <= MAX_CALL_TIMEOUT_S:
            raise AgentError(f"timeout_s must be in (0, {MAX_CALL_TIMEOUT_S:g}]", "timeout_s")
        price = int(row["price"])
        call_id = new_id("c")
        now = time.time()
        with self.db.transaction() as c:
            if price > 0:
                self.ledger.place_hold(
                    call_id,
                    wallet_id(caller),
                    price,
                    reason=f"hold for call {call_id} to {row['name']} of {row['agent']}",
                    memo={"call_id": call_id, "service": service_id},
                )
            c.execute(
                "INSERT INTO calls (id, service, service_name, agent, caller, price, input,"
                " state, created_at, deadline, idem_key, request_id)"
                " VALUES (?,?,?,?,?,?,?,'pending',?,?,?,?)",
                (call_id, service_id, row["name"], row["agent"], caller, price,
                 json.dumps(input), now, now + timeout, key, request_id),
            )  # fmt: skip
        call = self.call_row(call_id)
        assert call is not None
        return call, True

    def send_call(self, call: sqlite3.Row) -> None:
        """Publish the call to its agent (after the transaction that recorded it)."""
        self._send(
            protocol.agent_topic(str(call["agent"]), protocol.CALL),
            protocol.call(
                call["id"],
                call["service"],
                call["service_name"],
                call["caller"],
                json.loads(call["input"]),
                format_micro(int(call["price"])),
                int(float(call["deadline"]) * 1000),
            ),
        )

    def _finish(self, call: sqlite3.Row, state: str, output: Any, error: str | None) -> bool:
        """Move a pending call to its final state and its credits with it, exactly once."""
        call_id = str(call["id"])
        price = int(call["price"])
        with self.db.transaction() as c:
            cur = c.execute(
                "UPDATE calls SET state = ?, output = ?, error = ?, finished_at = ?"
                " WHERE id = ? AND state = 'pending'",
                (state, json.dumps(output) if state == "completed" else None, error,
                 time.time(), call_id),
            )  # fmt: skip
            if cur.rowcount != 1:
                return False
            if price > 0:
                if state == "completed":
                    self.ledger.open_account(wallet_id(call["agent"]), "wallet", call["agent"])
                    self.ledger.close_hold(
                        call_id,
                        [(wallet_id(call["agent"]), price)],
                        reason=f"call {call_id} to {call['service_name']} answered",
                    )
                else:
                    self.ledger.refund_hold(
                        call_id, reason=f"call {call_id} to {call['service_name']} {state}"
                    )
        event = self._events.pop(call_id, None)
        if event is not None:
            # Waiters run after this synchronous step, so after the COMMIT of the batch or
            # request that finished the call; a rollback leaves it pending and they wait on.
            event.set()
        if call["request_id"]:
            done = self.call_row(call_id)
            assert done is not None
            self._reply(str(call["caller"]), str(call["request_id"]), done)
        return True

    def _reply(self, caller: str, request_id: str, call: sqlite3.Row) -> None:
        view = msgspec.to_builtins(call_view(call))
        self._send(
            protocol.agent_topic(caller, protocol.REPLY),
            protocol.reply(request_id, call["state"] == "completed", view),
        )

    def expire(self, call: sqlite3.Row) -> bool:
        timeout = float(call["deadline"]) - float(call["created_at"])
        return self._finish(
            call,
            "timeout",
            None,
            f"agent {call['agent']} did not answer within {timeout:g}s; the caller was refunded",
        )

    async def wait(self, call_id: str, timeout_s: float) -> sqlite3.Row:
        """The call once it is final, or as it is after timeout_s (a long poll). A call past
        its deadline is expired here at once, not at the next tick."""
        end = time.monotonic() + max(0.0, timeout_s)
        while True:
            call = self.call_row(call_id)
            if call is None:
                raise AgentNotFound(f"no call {call_id}")
            if call["state"] != "pending":
                return call
            now = time.time()
            if now >= float(call["deadline"]):
                self.expire(call)
                continue
            remaining = min(end - time.monotonic(), float(call["deadline"]) - now)
            if remaining <= 0:
                return call
            event = self._events.setdefault(call_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining + 0.005)

    # --- MQTT, from the bridge (inside its batch transaction) ---------------------------
    def handle(self, agent_id: str, kind: str, payload: bytes | bytearray) -> str:
        """An `invoke` or `response` on dp/v1/agents/<agent_id>/. Returns what happened."""
        if kind == protocol.RESPONSE:
            return self._on_response(agent_id, payload)
        if kind == protocol.INVOKE:
            return self._on_invoke(agent_id, payload)
        return self._ignored(agent_id, f"unknown message kind {kind!r}")

    def _ignored(self, agent_id: str, why: str) -> str:
        log.warning("ignored message from agent %s: %s", agent_id, why)
        return "ignored: " + why

    def _token_of(self, agent_id: str, token: str) -> bool:
        user = self.store.user_by_token(token)
        return user is not None and user["id"] == agent_id

    def _on_response(self, agent_id: str, payload: bytes | bytearray) -> str:
        try:
            msg = msgspec.json.decode(payload, type=Response)
        except msgspec.DecodeError as e:
            return self._ignored(agent_id, f"malformed response: {e}")
        call = self.call_row(msg.call_id)
        if call is None:
            return self._ignored(agent_id, f"response to unknown call {msg.call_id}")
        if call["agent"] != agent_id:
            return self._ignored(
                agent_id,
                f"response to call {msg.call_id} from agent {agent_id}, but that call went to"
                f" {call['agent']}; nothing moved",
            )
        if not self._token_of(agent_id, msg.token):
            return self._ignored(agent_id, "token does not belong to this agent; nothing moved")
        if call["state"] != "pending":
            return self._ignored(
                agent_id, f"call {msg.call_id} is already {call['state']} (a duplicate or late"
                " response); nothing moved",
            )  # fmt: skip
        if time.time() >= float(call["deadline"]):
            self.expire(call)
            return self._ignored(
                agent_id, f"response to call {msg.call_id} came after its deadline; refunded"
            )
        if not msg.ok:
            self._finish(call, "failed", None, f"the agent answered with an error: {msg.error}")
            return "refunded: the agent answered with an error"
        if _json_size(msg.output) > protocol.MAX_CALL - 1024:
            self._finish(call, "failed", None, "the agent's output is too large")
            return "refunded: output too large"
        service = self._service_row(str(call["service"]))
        assert service is not None  # services are retired, never deleted
        problem = schema_problem(json.loads(service["output_schema"]), msg.output)
        if problem is not None:
            self._finish(
                call,
                "failed",
                None,
                f"the agent's output does not match the output schema of {call['service_name']}:"
                f" {problem}",
            )
            return "refunded: output does not match the schema"
        self._finish(call, "completed", msg.output, None)
        log.info("call %s answered by %s: %s paid", call["id"], agent_id,
                 format_micro(int(call["price"])))  # fmt: skip
        return "paid"

    def _on_invoke(self, agent_id: str, payload: bytes | bytearray) -> str:
        try:
            msg = msgspec.json.decode(payload, type=Invoke)
        except msgspec.DecodeError as e:
            return self._ignored(agent_id, f"malformed invoke: {e}")

        def refuse(status: int, error: str, **extra: Any) -> str:
            body = {"error": error, "status": status, **extra}
            self._send(
                protocol.agent_topic(agent_id, protocol.REPLY),
                protocol.reply(msg.request_id, False, body),
            )
            return f"invoke refused ({status}): {error}"

        if not self._token_of(agent_id, msg.token):
            return refuse(401, "token does not belong to this agent")
        try:
            call, new = self.start_call(
                agent_id, msg.service, msg.input, msg.timeout_s, "mqtt:" + msg.request_id,
                request_id=msg.request_id,
            )  # fmt: skip
        except InsufficientFunds as e:
            return refuse(402, str(e), shortfall=format_micro(e.shortfall))
        except AgentNotFound as e:
            return refuse(404, str(e))
        except CallConflict as e:
            return refuse(409, str(e))
        except AgentError as e:
            return refuse(400, str(e), field=e.field)
        except LedgerError as e:
            return refuse(400, str(e))
        if new:
            self.send_call(call)
            return f"invoke accepted: call {call['id']}"
        if call["state"] != "pending":
            self._reply(agent_id, msg.request_id, call)  # a retry of a finished call
        return f"invoke repeated: call {call['id']}"

    # --- time ---------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> int:
        """Expire overdue calls. Returns how many expired."""
        now = time.time() if now is None else now
        expired = 0
        for call in self.db.query(
            "SELECT * FROM calls WHERE state = 'pending' AND deadline <= ? LIMIT 500", (now,)
        ):
            try:  # one call that cannot be expired must not hold up the others (or the tick)
                if self.expire(call):
                    expired += 1
                    log.info("call %s to %s timed out; refunded", call["id"], call["agent"])
            except Exception:
                log.exception("could not expire call %s", call["id"])
        return expired

    def resend_pending(self) -> int:
        """After a hub start: calls recorded but maybe never published go out again (an
        agent answers a call id once; a repeated answer is ignored)."""
        n = 0
        for call in self.db.query("SELECT * FROM calls WHERE state = 'pending'"):
            self.send_call(call)
            n += 1
        return n

    def service_stopped(self, job_id: str) -> None:
        """A service job was stopped for want of credits (Jobs.bill_services, in the bridge's
        transaction): when it was an agent's, the agent and its owner are told, and the notice
        is kept in the same transaction."""
        r = self.db.query_one(
            "SELECT j.id, j.owner AS agent, j.name, j.reason, a.owner FROM jobs j"
            " JOIN users u ON u.id = j.owner AND u.role = 'agent'"
            " LEFT JOIN agents a ON a.id = j.owner WHERE j.id = ?",
            (job_id,),
        )
        if r is None:  # a user's own service job: the job's reason says it all
            return
        message = f"agent {r['agent']}: service job {r['id']} ({r['name']}) {r['reason']}"
        with self.db.transaction() as c:
            c.execute(
                "INSERT OR IGNORE INTO agent_notices (agent, owner, kind, ref, message,"
                " created_at) VALUES (?, ?, 'stopped', ?, ?, ?)",
                (r["agent"], r["owner"], r["id"], message, time.time()),
            )
        log.warning("%s; its owner %s is told", message, r["owner"] or "(none)")
        note = protocol.notice(r["agent"], "stopped", message, r["id"])
        self._send(protocol.agent_topic(str(r["agent"]), protocol.NOTICE), note)
        if r["owner"]:
            self._send(protocol.agent_topic(str(r["owner"]), protocol.NOTICE), note)


def _service_view(row: sqlite3.Row) -> ServiceView:
    return ServiceView(
        id=row["id"],
        agent=row["agent"],
        agent_name=row["agent_name"],
        name=row["name"],
        description=row["description"],
        tags=json.loads(row["tags"]),
        price=format_micro(int(row["price"])),
        input_schema=json.loads(row["input_schema"]),
        output_schema=json.loads(row["output_schema"]),
        timeout_s=float(row["timeout_s"]),
        created=float(row["created_at"]),
        updated=float(row["updated_at"]),
    )


def call_view(row: sqlite3.Row) -> CallView:
    completed = row["state"] == "completed"
    return CallView(
        id=row["id"],
        service=row["service"],
        service_name=row["service_name"],
        agent=row["agent"],
        caller=row["caller"],
        state=row["state"],
        input=json.loads(row["input"]),
        output=json.loads(row["output"]) if row["output"] is not None else None,
        error=row["error"],
        price=format_micro(int(row["price"])),
        paid=format_micro(int(row["price"]) if completed else 0),
        created=float(row["created_at"]),
        deadline=float(row["deadline"]),
        finished=float(row["finished_at"]) if row["finished_at"] is not None else None,
    )
