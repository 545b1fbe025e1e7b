"""The agent registry: agents, the services they sell, and paid calls between them.

An agent is a user with the role `agent` (its own wallet and API token), usually created by a
person who owns it and funds it. It registers services (name, description, tags, a price per
call, JSON Schemas for input and output) that anyone can find by text or tag, and answers
calls over MQTT; the calls and their settlement are in calls.py, the tables in schema.py, and
the limits, errors and views in types.py.

No aiohttp and no paho here: the API layer and the bridge call in, and messages go out through
the `publish` function the app attaches (see Calls.attach).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError

from edge.core import protocol
from hub.agents.calls import Calls
from hub.agents.types import (
    MAX_CALL_TIMEOUT_S,
    MAX_PRICE_CREDITS,
    MAX_SCHEMA_BYTES,
    MAX_TAGS,
    AgentError,
    AgentNotFound,
    ServiceView,
    service_view,
)
from hub.ledger.money import UnknownAccount, credits_to_micro, format_micro, wallet_id
from hub.store.rows import new_id

log = logging.getLogger(__name__)


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


class Agents(Calls):
    """The registry over the hub's Database and Ledger: agents, their services, and notices
    to them; the paid calls between them come from `Calls`."""

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

    def service(self, service_id: str, include_retired: bool = False) -> ServiceView | None:
        row = self._service_row(service_id)
        if row is None or (row["retired_at"] is not None and not include_retired):
            return None
        return service_view(row)

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
        return [service_view(r) for r in rows]

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
