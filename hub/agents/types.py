"""The agent room's leaf: its limits, errors, MQTT messages and views.

The errors are raised by the registry and by calls, and become HTTP statuses only in the API
layer (hub/api/agents.py) or MQTT replies in calls.py.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Annotated, Any

import msgspec

from hub.ledger.money import format_micro

DEFAULT_CALL_TIMEOUT_S = 30.0  # a service's default; a call may ask for less or more
MAX_CALL_TIMEOUT_S = 300.0
MAX_PRICE_CREDITS = 1_000_000
MAX_SCHEMA_BYTES = 64 * 1024
MAX_TAGS = 16
# The deepest JSON the hub reads from anyone (REST bodies, MQTT messages, a call's input and
# output): far more than any spec or schema needs, and far from what the decoders and the
# schema checks, which recurse, can take before they crash.
MAX_JSON_DEPTH = 64
CALL_STATES = ("pending", "completed", "failed", "timeout")


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


def service_view(row: sqlite3.Row) -> ServiceView:
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
