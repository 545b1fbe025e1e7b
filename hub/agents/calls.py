"""Paid calls between agents, through the hub: held, sent, settled exactly once.

A call goes through the hub:

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
from typing import Any

import jsonschema
import msgspec
from jsonschema.exceptions import best_match

from edge.core import protocol
from hub.agents.schema import COMPONENT, MIGRATIONS
from hub.agents.types import (
    DEFAULT_CALL_TIMEOUT_S,
    MAX_CALL_TIMEOUT_S,
    MAX_JSON_DEPTH,
    AgentError,
    AgentNotFound,
    CallConflict,
    CallView,
    Invoke,
    Response,
    call_view,
)
from hub.ledger.ledger import Ledger
from hub.ledger.money import InsufficientFunds, LedgerError, format_micro, wallet_id
from hub.store.db import Database
from hub.store.rows import Store, new_id

log = logging.getLogger(__name__)


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


def _too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Does value nest more than limit arrays and objects? (Without recursing: it may.)"""
    level: list[Any] = [value]  # after k rounds: what sits inside k arrays and objects
    for _ in range(limit):
        level = [
            v
            for item in level
            if isinstance(item, dict | list)
            for v in (item.values() if isinstance(item, dict) else item)
        ]
        if not level:
            return False
    return any(isinstance(v, dict | list) for v in level)


class Calls:
    """Calls between agents over the hub's Database and Ledger: the base of `Agents`
    (registry.py), which adds the agents and the services they sell."""

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

    def _service_row(self, service_id: str) -> sqlite3.Row | None:
        return self.db.query_one(
            "SELECT s.*, u.name AS agent_name FROM services s JOIN users u ON u.id = s.agent"
            " WHERE s.id = ?",
            (service_id,),
        )

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
        if _too_deep(input):  # the schema check and json.dumps below would recurse too far
            raise AgentError(
                f"input nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects", "input"
            )
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
        if msg.v != protocol.VERSION:
            return self._ignored(
                agent_id, f"response in protocol version {msg.v}, not {protocol.VERSION}"
            )
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

        if msg.v != protocol.VERSION:
            return refuse(
                400,
                f"protocol version {msg.v} is not supported: this hub speaks version"
                f" {protocol.VERSION} (docs/protocol.md)",
                field="v",
            )
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
