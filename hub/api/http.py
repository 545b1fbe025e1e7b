"""What every REST handler shares: the services, JSON in and out, who is calling, and the
middleware that turns domain errors into HTTP statuses (the only place that does).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

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


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
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
        return error(e.status, message)


async def decode_body(request: web.Request, type_: type[T]) -> T:
    body = await request.read()
    if not body:
        raise msgspec.ValidationError("request body is empty; send a JSON object")
    return msgspec.json.decode(body, type=type_)


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
