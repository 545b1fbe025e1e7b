"""The Agent Console: agents with their services, wallets and lifecycle state; the service
directory; and a console to call a service and read its reply with its price, like a chat.

Everything goes through the agent registry (hub/agents/): the call is held, sent, settled
and refunded there, exactly as for the REST API."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from hub.agents.types import AgentError, AgentNotFound, CallConflict
from hub.api.auth import Identity
from hub.ledger.money import InsufficientFunds
from hub.mqtt.wire import json_problem
from hub.web import forms, queries, session
from hub.web.pages import Context, not_found, page, render
from hub.web.session import services

TRANSCRIPT = 20


def _registry(request: web.Request) -> Any:
    return services(request).agents


@page("agents.html", "agents")
async def agents_page(request: web.Request, who: Identity) -> Context:
    registry = _registry(request)
    q = (request.query.get("q") or "").strip()[:128]
    tag = (request.query.get("tag") or "").strip()[:32] or None
    mine = [registry.agent_view(r) for r in registry.agents(None if who.is_admin else who.user_id)]
    return {
        "agents": mine,
        "services": registry.search(q=q or None, tag=tag, limit=100),
        "q": q,
        "tag": tag or "",
    }


@page("agent.html", "agents")
async def agent_page(request: web.Request, who: Identity) -> Context:
    registry = _registry(request)
    agent_id = request.match_info["agent_id"]
    user = services(request).store.user(agent_id)
    if (
        user is None
        or user["role"] != "agent"
        or not registry.may_see(who.user_id, who.is_admin, agent_id)
    ):
        raise not_found(f"no agent {agent_id}")
    row = next(r for r in registry.agents(None) if r["id"] == agent_id)
    calls = registry.calls(agent_id, 30)
    names = queries.user_names(
        services(request).db, {c.caller for c in calls} | {c.agent for c in calls}
    )
    return {
        "agent": registry.agent_view(row),
        "services": registry.search(agent=agent_id, limit=100),
        "calls": calls,
        "names": names,
    }


def _skeleton(schema: dict[str, Any]) -> Any:
    """An example input from a JSON Schema, for the console's text box to start from."""
    kind = schema.get("type")
    if "default" in schema:
        return schema["default"]
    if kind == "object" or "properties" in schema:
        return {k: _skeleton(v) for k, v in (schema.get("properties") or {}).items()}
    blanks: dict[str, Any] = {"integer": 0, "number": 0, "string": "", "boolean": False,
                              "array": []}  # fmt: skip
    return blanks.get(str(kind))


def _console(request: web.Request, who: Identity, service_id: str) -> Context:
    registry = _registry(request)
    service = registry.service(service_id)
    if service is None:
        raise not_found(f"no service {service_id}")
    calls = [c for c in registry.calls(who.user_id, 200) if c.service == service_id]
    transcript = [
        {"call": c, "input": json.dumps(c.input, indent=2),
         "output": json.dumps(c.output, indent=2) if c.output is not None else None}
        for c in reversed(calls[:TRANSCRIPT])
    ]  # fmt: skip
    return {
        "service": service,
        "schema": json.dumps(service.input_schema, indent=2),
        "transcript": transcript,
        "own": service.agent == who.user_id,
        "form": {
            "input": json.dumps(_skeleton(service.input_schema), indent=2),
            "key": forms.new_key(),
        },
        "errors": {},
    }


async def console_page(request: web.Request) -> web.Response:
    started = time.perf_counter()
    who = session.require(request)
    ctx = _console(request, who, request.match_info["service_id"])
    return render(request, who, "console.html", "agents", ctx, started)


async def console_call(request: web.Request) -> web.Response:
    """Call the service as the signed-in identity and wait for the reply (up to the call's
    own deadline), then show the conversation with it."""
    started = time.perf_counter()
    who = session.require(request)
    service_id = request.match_info["service_id"]
    ctx = _console(request, who, service_id)
    post = await request.post()
    text = str(post.get("input") or "").strip()
    key = str(post.get("key") or "")[:64] or forms.new_key()
    ctx["form"] = {"input": text, "key": key}
    errors: dict[str, str] = {}
    # What the REST API refuses before decoding (hub/mqtt/wire.py): nesting deeper than
    # json.loads can recurse, and a key given twice.
    problem = json_problem(text.encode())
    if problem is not None:
        errors["input"] = f"The input {problem}."
    else:
        try:
            value = json.loads(text) if text else None
        except json.JSONDecodeError as e:
            errors["input"] = (
                f"That is not JSON ({e.msg}, line {e.lineno}). Write it like "
                '{"text": "hi"}, with double quotes around names and strings.'
            )
    if not errors:
        registry = _registry(request)
        try:
            call, new = registry.start_call(who.user_id, service_id, value, None, "web:" + key)
        except InsufficientFunds as e:
            errors["input"] = forms.short_of(e)
        except (AgentNotFound, CallConflict, AgentError) as e:
            errors["input"] = str(e)
        else:
            if new:
                registry.send_call(call)
            await registry.wait(call["id"], float(call["deadline"]) - time.time() + 1)
            raise web.HTTPSeeOther(f"/agents/console/{service_id}#c-{call['id']}")
    ctx["errors"] = errors
    return render(request, who, "console.html", "agents", ctx, started, 400)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/agents", agents_page)
    r.add_get("/agents/console/{service_id}", console_page)
    r.add_post("/agents/console/{service_id}", console_call)
    r.add_get("/agents/{agent_id}", agent_page)
