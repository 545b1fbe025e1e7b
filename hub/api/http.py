"""What every REST handler shares: the services, JSON in and out, who is calling, and the
middleware that turns domain errors into HTTP statuses (the only place that does).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

import msgspec
from aiohttp import web

from hub.agents.types import AgentError, AgentForbidden, AgentNotFound, CallConflict
from hub.api import auth
from hub.api.auth import AuthError, Identity
from hub.ledger.money import (
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    LedgerError,
    UnknownAccount,
    format_micro,
)
from hub.market.errors import JobConflict, JobError, JobNotFound, NotAllowed
from hub.market.spec import error_field
from hub.mqtt.wire import json_problem

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _services(request: web.Request) -> Any:
    from hub.api.services import SERVICES

    return request.app[SERVICES]


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(obj), status=status, content_type="application/json"
    )


def error(status: int, message: str, **extra: Any) -> web.Response:
    body = {"error": message}
    body.update({k: v for k, v in extra.items() if v is not None})
    return json_response(body, status)


class BadRequest(Exception):
    """A request the API cannot read (its body, a header, a query parameter): a 400 naming
    the part at fault."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def header_problem(request: web.Request) -> web.Response | None:
    """A header no handler could use: bytes that are not UTF-8 (aiohttp hands them on as
    lone surrogates, which SQLite, JWT and base64 then choke on), or credentials that are not
    ASCII (a JWT and HTTP Basic are both base64)."""
    for name, value in request.headers.items():
        if value.isascii():
            continue
        if name.lower() == "authorization":
            return error(
                401, "the Authorization header must be ASCII: 'Bearer <jwt>' (or HTTP Basic"
                " for a node), as POST /api/v1/auth/token returns it",
            )  # fmt: skip
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return error(400, f"the {name} header is not UTF-8 text", field=str(name))
    return None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    refused = header_problem(request)
    if refused is not None:
        return refused
    try:
        return await handler(request)
    except BadRequest as e:
        return error(400, str(e), field=e.field)
    except web.RequestPayloadError as e:
        # The body could not be read as sent (Content-Encoding: gzip, say, on bytes that
        # are not gzip). Nothing of it was read; the rest of it is dropped with the connection.
        request.content.feed_eof()
        response = error(
            400, f"the request body cannot be read: {str(e).split(':', 1)[-1].strip()} (send "
            "it as Content-Encoding says, or without Content-Encoding)",
        )  # fmt: skip
        response.force_close()
        return response
    except AuthError as e:
        return error(401, str(e))
    except InsufficientFunds as e:
        return error(402, str(e), shortfall=format_micro(e.shortfall))
    except JobNotFound as e:
        return error(404, str(e))
    except JobConflict as e:
        return error(409, str(e))
    except NotAllowed as e:
        return error(403, str(e))
    except JobError as e:
        return error(400, str(e), field=e.field)
    except AgentNotFound as e:
        return error(404, str(e))
    except AgentForbidden as e:
        return error(403, str(e))
    except CallConflict as e:
        return error(409, str(e))
    except AgentError as e:
        return error(400, str(e), field=e.field)
    except IdempotencyConflict as e:
        return error(409, f"{e}: that Idempotency-Key was used for a different request")
    except UnknownAccount as e:
        return error(404, str(e))
    except LedgerError as e:
        return error(400, str(e), field="amount" if isinstance(e, InvalidAmount) else None)
    except msgspec.ValidationError as e:
        return error(400, f"invalid request: {e}", field=error_field(str(e)))
    except msgspec.DecodeError as e:
        return error(400, f"request body is not valid JSON: {e}")
    except web.HTTPException as e:
        if e.status < 400 or not request.path.startswith("/api/"):
            raise
        message = {
            404: f"no such endpoint: {request.method} {request.path} (see /api/v1/openapi.json)",
            405: f"{request.method} is not allowed on {request.path}",
            413: f"request body is over the hub's {request.app._client_max_size} byte limit",
        }.get(e.status, e.reason)
        response = error(e.status, message)
        if isinstance(e, web.HTTPMethodNotAllowed):
            response.headers["Allow"] = ", ".join(sorted(e.allowed_methods))
        return response


async def decode_body(request: web.Request, type_: type[T]) -> T:
    body = await request.read()
    if not body:
        raise msgspec.ValidationError("request body is empty; send a JSON object")
    problem = json_problem(body)
    if problem is not None:
        raise BadRequest("request body " + problem)
    try:
        try:
            return msgspec.json.decode(body, type=type_)
        except msgspec.ValidationError as e:
            if "got `float`" not in str(e):
                raise
            # JSON has numbers, not ints and floats: 2.0 is the integer 2 (JSON Schema agrees)
            return msgspec.convert(_whole_numbers(msgspec.json.decode(body)), type=type_)
    except RecursionError:  # json_problem bounds the depth; this is in case a type recurses
        raise BadRequest("request body nests too deep") from None


def _whole_numbers(value: Any) -> Any:
    """A decoded JSON value with each float that is a whole number (2.0) as that integer."""
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) <= 2**53 else value
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    return value


_WHOLE = re.compile(r"-?[0-9]{1,19}")


@overload
def query_int(request: web.Request, name: str, lo: int, hi: int, default: int) -> int: ...
@overload
def query_int(request: web.Request, name: str, lo: int, hi: int) -> int | None: ...
def query_int(
    request: web.Request, name: str, lo: int, hi: int, default: int | None = None
) -> int | None:
    """A whole-number query parameter from lo to hi (default when absent): plain ASCII
    digits, as the OpenAPI document declares it; BadRequest naming it otherwise."""
    raw = request.query.get(name)
    if raw is None:
        return default
    value = int(raw) if _WHOLE.fullmatch(raw) else None
    if value is None or not lo <= value <= hi:
        raise BadRequest(f"{name} must be a whole number from {lo} to {hi}, not {raw!r}", name)
    return value


def identity(request: web.Request, node_ok: bool = False) -> Identity:
    """Who is calling. A node's token is good only where node_ok says so (its own record):
    it holds no wallet, owns no jobs and speaks for nobody else."""
    services = _services(request)
    who = auth.verify(services.config.jwt_secret, auth.bearer(request.headers.get("Authorization")))
    if who.is_node and not node_ok:
        raise NotAllowed(
            f"node {who.user_id}'s token may only read its own node record; "
            "use a user's or agent's API token for this"
        )
    return who


def require_admin(request: web.Request) -> Identity:
    who = identity(request)
    if not who.is_admin:
        raise NotAllowed("only an admin may do this")
    return who
