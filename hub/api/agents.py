"""REST routes of the agent registry: agents, services, and paid calls (docs/agents.md).

Thin handlers over hub/agents/; its errors become HTTP statuses here (ledger errors, such
as 402 for a caller who cannot pay, go through the API's error middleware).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from aiohttp import web

from hub.agents import registry
from hub.agents.types import (
    MAX_CALL_TIMEOUT_S,
    MAX_TAGS,
    AgentError,
    AgentForbidden,
    AgentNotFound,
    CallView,
    ServiceName,
    ServiceView,
    Tag,
    Text,
    call_view,
)
from hub.api.auth import Identity
from hub.api.http import BadRequest, _services, decode_body, identity, json_response, query_int
from hub.ledger.money import credits_to_micro, format_micro

Credits = str | int  # a decimal string ("0.01") or a whole number of credits


class CreateAgent(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[\w.\- ]+$")]
    fund: Credits = "0"  # credits moved from the creator's wallet to the new agent


class AgentCreated(msgspec.Struct):
    id: str
    name: str
    owner: str
    token: str  # the agent's API token (and MQTT password), shown once
    balance: str


class RegisterService(msgspec.Struct, forbid_unknown_fields=True):
    name: ServiceName
    price: Credits  # credits per call
    description: Text = ""
    tags: Annotated[list[Tag], msgspec.Meta(max_length=MAX_TAGS)] = []
    input_schema: dict[str, Any] = msgspec.field(default_factory=dict)
    output_schema: dict[str, Any] = msgspec.field(default_factory=dict)
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_CALL_TIMEOUT_S)] | None = None
    # Optional: the agent registering. Only the agent itself may; anyone else gets a 403.
    agent: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class CallRequest(msgspec.Struct, forbid_unknown_fields=True):
    input: Any = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_CALL_TIMEOUT_S)] | None = None


API_TYPES: list[Any] = [CreateAgent, AgentCreated, RegisterService, ServiceView, CallRequest,
                        CallView]  # fmt: skip


def _agents(request: web.Request) -> registry.Agents:
    agents: registry.Agents = _services(request).agents
    return agents


def _key(request: web.Request) -> str:
    key = request.headers.get("Idempotency-Key")
    if not key or len(key) > 128:
        raise AgentError(
            "an Idempotency-Key header (1 to 128 characters) is required: a retry with the "
            "same key returns the same call and never charges twice",
            "Idempotency-Key",
        )
    return key


MAX_CALLS_LISTED = 500
MAX_SERVICES_LISTED = 500
# Seconds as plain ASCII decimals (an exponent allowed): float() would also take "nan",
# "inf", " 5" and digits of other scripts.
_SECONDS = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _seconds(request: web.Request, name: str) -> float:
    """A query parameter of seconds to wait, 0 when absent; over the longest call's timeout
    it waits that long."""
    raw = request.query.get(name, "0")
    if not _SECONDS.fullmatch(raw):
        raise BadRequest(f"{name} must be a number of seconds (0 to {MAX_CALL_TIMEOUT_S:g}), "
                         f"not {raw!r}", name)  # fmt: skip
    return min(float(raw), MAX_CALL_TIMEOUT_S)


def _flag(request: web.Request, name: str, default: str) -> bool:
    raw = request.query.get(name, default)
    if raw not in ("0", "1"):
        raise BadRequest(f"{name} must be 0 or 1, not {raw!r}", name)
    return raw == "1"


def _visible_agent(request: web.Request) -> tuple[Identity, str]:
    who = identity(request)
    agent_id = request.match_info["agent_id"]
    agents = _agents(request)
    if agents.agent_row(agent_id) is None or not agents.may_see(
        who.user_id, who.is_admin, agent_id
    ):
        raise AgentNotFound(f"no agent {agent_id} of yours")  # don't confirm others exist
    return who, agent_id


# --- agents -----------------------------------------------------------------------------------
async def create_agent(request: web.Request) -> web.Response:
    who = identity(request)
    services = _services(request)
    req = await decode_body(request, CreateAgent)
    fund = credits_to_micro(req.fund)
    if fund < 0:
        raise AgentError(f"fund must be 0 or more credits, not {req.fund}", "fund")
    agent_id, token = _agents(request).create_agent(who.user_id, req.name, fund)
    # The agent logs in to the broker with its id and token: the broker must know it now.
    await services.broker_accepts(agent_id, token)
    balance = services.ledger.balance("wallet:" + agent_id)
    return json_response(
        AgentCreated(agent_id, req.name, who.user_id, token, format_micro(balance)), 201
    )


async def list_agents(request: web.Request) -> web.Response:
    who = identity(request)
    agents = _agents(request)
    viewer = None if _flag(request, "all", "1") and who.is_admin else who.user_id
    return json_response({"agents": [agents.agent_view(r) for r in agents.agents(viewer)]})


async def get_agent(request: web.Request) -> web.Response:
    _, agent_id = _visible_agent(request)
    agents = _agents(request)
    row = agents.agent_row(agent_id)
    assert row is not None  # _visible_agent checked it
    return json_response(agents.agent_view(row))


async def agent_calls(request: web.Request) -> web.Response:
    _, agent_id = _visible_agent(request)
    limit = query_int(request, "limit", 1, MAX_CALLS_LISTED, default=50)
    return json_response({"calls": _agents(request).calls(agent_id, limit)})


# --- services ---------------------------------------------------------------------------------
async def register_service(request: web.Request) -> web.Response:
    who = identity(request)
    req = await decode_body(request, RegisterService)
    if req.agent is not None and req.agent != who.user_id:
        raise AgentForbidden(
            f"you are {who.user_id}: only agent {req.agent} itself may register its services "
            "(log in with its API token)"
        )
    if who.role != "agent":
        raise AgentForbidden(
            f"only agents register services, and {who.user_id} is a {who.role}: create an "
            "agent with POST /api/v1/agents and use its API token"
        )
    view, created = _agents(request).register(
        who.user_id,
        name=req.name,
        description=req.description,
        tags=list(req.tags),
        price=req.price,
        input_schema=req.input_schema,
        output_schema=req.output_schema,
        timeout_s=req.timeout_s,
    )
    return json_response(view, 201 if created else 200)


async def search_services(request: web.Request) -> web.Response:
    identity(request)
    q = request.query.get("q")
    tag = request.query.get("tag")
    agent = request.query.get("agent")
    limit = query_int(request, "limit", 1, MAX_SERVICES_LISTED, default=100)
    found = _agents(request).search(q=q, tag=tag, agent=agent, limit=limit)
    return json_response({"services": found})


async def get_service(request: web.Request) -> web.Response:
    identity(request)
    service_id = request.match_info["service_id"]
    view = _agents(request).service(service_id)
    if view is None:
        raise AgentNotFound(f"no service {service_id}")
    return json_response(view)


async def retire_service(request: web.Request) -> web.Response:
    who = identity(request)
    view = _agents(request).retire(who.user_id, request.match_info["service_id"])
    return json_response(view)


# --- calls ------------------------------------------------------------------------------------
async def call_service(request: web.Request) -> web.Response:
    """Hold the price, send the call to the agent, and wait for its answer (up to the call's
    timeout): 200 with the final call, or 202 with the pending call if the client should poll
    GET /api/v1/agents/calls/{id} (when `wait=0` is asked)."""
    who = identity(request)
    key = _key(request)
    wait = _flag(request, "wait", "1")  # before anything is held
    req = await decode_body(request, CallRequest)
    agents = _agents(request)
    call, new = agents.start_call(
        who.user_id, request.match_info["service_id"], req.input, req.timeout_s, "rest:" + key
    )
    if new:
        agents.send_call(call)
    if wait:
        call = await agents.wait(call["id"], MAX_CALL_TIMEOUT_S)
    status = 202 if call["state"] == "pending" else 200 if not new else 201
    return json_response(call_view(call), status)


async def get_call(request: web.Request) -> web.Response:
    """One call, for its caller, its agent, their owners and admins. `?wait=S` long-polls up
    to S seconds (at most 300) for it to finish."""
    who = identity(request)
    agents = _agents(request)
    call_id = request.match_info["call_id"]
    call = agents.call_row(call_id)
    if call is None or not (
        who.is_admin
        or who.user_id in (call["caller"], call["agent"])
        or who.user_id in (agents.owner_of(call["caller"]), agents.owner_of(call["agent"]))
    ):
        raise AgentNotFound(f"no call {call_id}")
    wait = _seconds(request, "wait")
    if wait > 0:
        call = await agents.wait(call_id, wait)
    return json_response(call_view(call))


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/agents", create_agent)
    r.add_get("/api/v1/agents", list_agents)
    r.add_post("/api/v1/agents/services", register_service)
    r.add_get("/api/v1/agents/services", search_services)
    r.add_get("/api/v1/agents/services/{service_id}", get_service)
    r.add_delete("/api/v1/agents/services/{service_id}", retire_service)
    r.add_post("/api/v1/agents/services/{service_id}/call", call_service)
    r.add_get("/api/v1/agents/calls/{call_id}", get_call)
    r.add_get("/api/v1/agents/{agent_id}", get_agent)
    r.add_get("/api/v1/agents/{agent_id}/calls", agent_calls)


def openapi_paths(op: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """This module's part of the OpenAPI document (hub/openapi.py builds the rest)."""

    def param(name: str, where: str = "path", **schema: Any) -> dict[str, Any]:
        return {
            "name": name,
            "in": where,
            "required": where == "path",
            "schema": {"type": "string", **schema},
        }

    def limit(most: int, default: int) -> dict[str, Any]:
        schema = {"type": "integer", "minimum": 1, "maximum": most}
        return {**param("limit", "query"), "schema": schema, "description": f"default {default}"}

    def flag(name: str, description: str) -> dict[str, Any]:
        return {**param(name, "query", enum=["0", "1"]), "description": description}

    call_op = op(
        "Call a service: hold its price, wait for the agent's answer; pays the agent once on "
        "success, refunds on error or timeout (Idempotency-Key header required). 201: a new "
        "call, answered; 200: the same key again; 202: still pending (with wait=0, or when "
        "the agent has not answered yet)",
        "CallView",
        body="CallRequest",
        errors=(400, 401, 402, 404, 409),
    )
    for status in ("201", "202"):
        call_op["responses"][status] = call_op["responses"]["200"]
    call_op["parameters"] = [
        param("service_id"),
        {**param("Idempotency-Key", "header"), "required": True},
        flag("wait", "1 (the default): wait for the answer; 0: answer 202 at once"),
    ]
    register_op = op(
        "Register (201) or update (200: the same agent and name) a service of the calling agent",
        "ServiceView",
        201,
        body="RegisterService",
        errors=(400, 401, 403),
    )
    register_op["responses"]["200"] = register_op["responses"]["201"]
    seconds = {"type": "number", "minimum": 0}
    wait = {**param("wait", "query"), "schema": seconds, "description": "at most 300 s"}
    return {
        "/api/v1/agents": {
            "get": {
                **op("Agents (mine and the ones I own; all for an admin)", None),
                "parameters": [flag("all", "an admin's: 1 (the default) all, 0 their own")],
            },
            "post": op(
                "Create an agent I own, funded from my wallet (402: the wallet cannot pay it)",
                "AgentCreated",
                201,
                body="CreateAgent",
                errors=(400, 401, 402),
            ),
        },
        "/api/v1/agents/{agent_id}": {
            "get": {**op("One agent", None, errors=(401, 404)), "parameters": [param("agent_id")]}
        },
        "/api/v1/agents/{agent_id}/calls": {
            "get": {
                **op("An agent's recent calls (made and served)", None, errors=(400, 401, 404)),
                "parameters": [param("agent_id"), limit(MAX_CALLS_LISTED, 50)],
            }
        },
        "/api/v1/agents/services": {
            "get": {
                **op("Find services by text (q), tag and agent", None, errors=(400, 401)),
                "parameters": [
                    param("q", "query"),
                    param("tag", "query"),
                    param("agent", "query"),
                    limit(MAX_SERVICES_LISTED, 100),
                ],
            },
            "post": register_op,
        },
        "/api/v1/agents/services/{service_id}": {
            "get": {
                **op("One service", "ServiceView", errors=(401, 404)),
                "parameters": [param("service_id")],
            },
            "delete": {
                **op("Retire a service of mine", "ServiceView", errors=(401, 404)),
                "parameters": [param("service_id")],
            },
        },
        "/api/v1/agents/services/{service_id}/call": {"post": call_op},
        "/api/v1/agents/calls/{call_id}": {
            "get": {
                **op("One call; ?wait=S long-polls", "CallView", errors=(400, 401, 404)),
                "parameters": [param("call_id"), wait],
            },
        },
    }
