"""The OpenAPI 3.1 document, built from the same msgspec types the handlers decode with."""

from __future__ import annotations

from typing import Any

import msgspec

from hub.agents.types import MAX_PRICE_CREDITS
from hub.api import bootstrap, types
from hub.api.jobs import MAX_LIST
from hub.api.wallet import MAX_HISTORY
from hub.ledger.money import INT64_MAX, MAX_CREDITS
from hub.market import spec, verification

_TYPES: list[Any] = [
    spec.JobSpec,
    types.SubmitResponse,
    types.JobView,
    types.WalletView,
    types.TransferRequest,
    types.TransferResponse,
    types.TokenRequest,
    types.TokenResponse,
    types.NodeTokenRequest,
    types.CreateUser,
    types.UserCreated,
    types.EnrollmentTokenView,
    types.EnrollRequest,
    types.EnrollResponse,
    types.NodeView,
    types.NodeList,
    types.ErrorBody,
    types.BlobView,
    *bootstrap.API_TYPES,
]


def credits_pattern(most: int, zero: bool = False) -> str:
    """The decimal strings hub/ledger/money.py takes as an amount from 0.000001 (or from 0,
    with zero) to `most` credits, a power of ten: plain ASCII digits, at most 6 decimals (zeros
    after them are fine), a '-' only on a zero. Exact, so that a string it refuses is one the
    hub refuses too (schemathesis sends those, expecting a 400)."""
    digits = len(str(most)) - 1
    assert most == 10**digits, most
    small = "|".join(f"0{{{k}}}[1-9][0-9]{{0,{5 - k}}}" for k in range(6))  # .000001 to .999999
    forms = [
        rf"0*[1-9][0-9]{{0,{digits - 1}}}(\.[0-9]{{0,6}}0*)?",  # 1 to just under `most`
        rf"0*\.({small})0*",  # under 1
        rf"0*1{'0' * digits}(\.0*)?",  # `most` itself
    ]
    if zero:
        forms.append(r"-?(0+(\.0*)?|0*\.0+)")
    return f"^({'|'.join(forms)})$"


POSITIVE_CREDITS = credits_pattern(MAX_CREDITS)


def _credits(most: int, default: str | None = None) -> dict[str, Any]:
    """A `str | int` field of credits from 0 to `most`, as the handler takes it."""
    text = {"type": "string", "maxLength": 64, "pattern": credits_pattern(most, zero=True)}
    whole = {"type": "integer", "minimum": 0, "maximum": most}
    return {"anyOf": [text, whole]} | ({"default": default} if default is not None else {})


def _int_param(name: str, lo: int, hi: int, description: str) -> dict[str, Any]:
    """A whole-number query parameter, bounded as its handler checks it (hub/api/http.py)."""
    schema = {"type": "integer", "minimum": lo, "maximum": hi}
    return {"name": name, "in": "query", "description": description, "schema": schema}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": _ref(name)}}}


def _op(
    summary: str,
    ok: str | None,
    status: int = 200,
    body: str | None = None,
    errors: tuple[int, ...] = (400, 401),
    auth: bool = True,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {}}
    op["responses"][str(status)] = (
        {"description": "OK", **_json(ok)} if ok else {"description": "OK"}
    )
    for code in errors:
        op["responses"][str(code)] = {"description": "Error", **_json("ErrorBody")}
    if body:
        op["requestBody"] = {"required": True, **_json(body)}
    if auth:
        op["security"] = [{"bearer": []}]
    return op


def document() -> dict[str, Any]:
    from hub.api import agents as agents_api  # the agents routes describe their own types

    _, components = msgspec.json.schema_components(
        _TYPES + agents_api.API_TYPES, ref_template="#/components/schemas/{name}"
    )
    # What hub/ledger/money.py takes as a transfer's amount, which the handler checks with a
    # message of its own (a pattern on the type would answer with the regex instead).
    components["TransferRequest"]["properties"]["amount"]["pattern"] = POSITIVE_CREDITS
    # The same for an agent's funds and a service's price (hub/api/agents.py), and the bounds
    # of a job's replicas (hub/market/admission.py, again with messages of their own).
    components["CreateAgent"]["properties"]["fund"] = _credits(MAX_CREDITS, default="0")
    components["RegisterService"]["properties"]["price"] = _credits(MAX_PRICE_CREDITS)
    replicas = components["Verify"]["properties"]["replicas"]
    replicas.update(minimum=1, maximum=verification.MAX_REPLICAS)
    job_id = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    node_id = [{"name": "node_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    paths: dict[str, Any] = {
        "/api/v1/auth/token": {
            "post": _op(
                "Exchange an API token for a JWT", "TokenResponse", body="TokenRequest", auth=False
            )
        },
        "/api/v1/auth/node-token": {
            "post": _op(
                "A node's id and MQTT password (from node.json) for a JWT with the node role: "
                "it may read its own node record and nothing else",
                "TokenResponse",
                body="NodeTokenRequest",
                auth=False,
            )
        },
        "/api/v1/users": {
            "post": _op(
                "Create a user (admin); returns its API token",
                "UserCreated",
                201,
                "CreateUser",
                (400, 401, 403),
            )
        },
        "/api/v1/wallet": {"get": _op("My balance and held credits", "WalletView")},
        "/api/v1/wallet/history": {
            "get": {
                **_op("My wallet's movements, newest first (?format=csv for a statement)", None),
                "parameters": [
                    _int_param("limit", 1, MAX_HISTORY, "entries per page (default 50)"),
                    _int_param("before", 1, INT64_MAX, "the next page: entries before this one"),
                    {
                        "name": "format",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["json", "csv"]},
                    },
                ],
            }
        },
        "/api/v1/wallet/transfer": {
            "post": {
                **_op(
                    "Send credits to another user or agent; retry with the same key is harmless",
                    "TransferResponse",
                    201,
                    "TransferRequest",
                    (400, 401, 402, 404, 409),
                ),
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 128},
                    }
                ],
            }
        },
        "/api/v1/ledger/audit": {
            "get": _op(
                "Check the books (admin): totals per account kind, zero sum, invariants",
                None,
                errors=(401, 403),
            )
        },
        "/api/v1/blobs": {
            "post": {
                **_op(
                    "Upload a module or input (raw bytes); returns its sha256 reference",
                    "BlobView",
                    201,
                    errors=(400, 401, 413),
                ),
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary", "minLength": 1}
                        }
                    },
                },
            }
        },
        "/api/v1/jobs": {
            "post": {
                **_op(
                    "Submit a job: priced on the server, the maximum is held before queueing",
                    "SubmitResponse",
                    201,
                    "JobSpec",
                    (400, 401, 402, 409),
                ),
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 128},
                    }
                ],
            },
            "get": {
                **_op("My jobs, newest first", None),
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"type": "string", "enum": list(spec.JOB_STATES)},
                    },
                    _int_param("limit", 1, MAX_LIST, "jobs per answer (default 50)"),
                    {
                        "name": "all",
                        "in": "query",
                        "description": "1: everyone's (an admin)",
                        "schema": {"type": "string", "enum": ["0", "1"]},
                    },
                ],
            },
        },
        "/api/v1/jobs/{job_id}": {
            "get": {
                **_op(
                    "A job: state, result, cost, node, timings", "JobView", errors=(401, 403, 404)
                ),
                "parameters": job_id,
            }
        },
        "/api/v1/jobs/{job_id}/outputs/{path}": {
            "get": {
                **_op(
                    "A file the job wrote under /outputs (its path relative to /outputs);"
                    " X-Content-SHA256 carries its digest. 410 once the hub's retention is over",
                    None,
                    errors=(401, 403, 404, 410),
                ),
                "parameters": [
                    *job_id,
                    {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}},
                ],
            }
            | {
                "responses": {
                    **_op("", None, errors=(401, 403, 404, 410))["responses"],
                    "200": {
                        "description": "the file's bytes",
                        "content": {
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            }
                        },
                    },
                }
            }
        },
        "/api/v1/jobs/{job_id}/cancel": {
            "post": {
                **_op(
                    "Cancel a job and release its hold (repeating it is harmless)",
                    "JobView",
                    errors=(401, 403, 404),
                ),
                "parameters": job_id,
            }
        },
        "/api/v1/enrollment-tokens": {
            "post": _op(
                "Create a single-use token that enrolls one node to my wallet",
                "EnrollmentTokenView",
                201,
            )
        },
        "/api/v1/nodes/enroll": {
            "post": _op(
                "Enroll a node: returns its id, secret and MQTT credentials",
                "EnrollResponse",
                201,
                "EnrollRequest",
                auth=False,
            )
        },
        "/api/v1/nodes": {"get": _op("Nodes (mine; all for an admin)", "NodeList")},
        "/api/v1/nodes/{node_id}": {
            "get": {
                **_op(
                    "One node: state, slots, GPUs and credits earned. The node itself "
                    "authenticates with HTTP Basic (node id, MQTT password); users with their JWT",
                    "NodeView",
                    errors=(401, 404),
                ),
                "security": [{"bearer": []}, {"nodeBasic": []}],
                "parameters": node_id,
            },
            "delete": {
                **_op(
                    "Remove a node (its owner or an admin): its broker login goes, its jobs go "
                    "back to the queue, its history stays. Repeating it is harmless",
                    None,
                    errors=(401, 403, 404),
                ),
                "parameters": node_id,
            },
        },
        "/api/v1/status": {
            "get": _op(
                "Hub, broker (and its public URL), node counts, the hub's time",
                None,
                errors=(),
                auth=False,
            )
        },
        "/api/v1/openapi.json": {"get": _op("This document", None, errors=(), auth=False)},
        "/api/v1/bootstrap": {
            "get": {
                **_op(
                    "The hub's live replicas and the MQTT brokers they give nodes, best first "
                    "(in ?region= first, then the least loaded), and how often to ask again",
                    "BootstrapView",
                    errors=(400, 503),
                    auth=False,
                ),
                "parameters": [
                    {
                        "name": "region",
                        "in": "query",
                        "description": "put the replicas of this region first",
                        "schema": {"type": "string", "pattern": bootstrap.REGION_PATTERN},
                    }
                ],
            }
        },
        "/api/v1/tls/ca": {
            "get": {
                "summary": "The certificate nodes pin (the hub's CA), as PEM, for a node to "
                "fetch before it trusts anything and check against the fingerprint in its "
                "enrollment command (docs/tls.md); 404 when the hub serves no TLS",
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {"application/x-pem-file": {"schema": {"type": "string"}}},
                        "headers": {
                            "X-Fingerprint": {
                                "description": "sha256: and the hex SHA-256 of its DER bytes",
                                "schema": {"type": "string"},
                            }
                        },
                    },
                    "404": {"description": "Error", **_json("ErrorBody")},
                },
            }
        },
        **agents_api.openapi_paths(_op),
    }
    for ops in paths.values():  # every handler takes a key of 1 to 128 characters
        for op in ops.values():
            for param in op.get("parameters", []):
                if param["name"] == "Idempotency-Key" and param["in"] == "header":
                    param["schema"] = {"type": "string", "minLength": 1, "maxLength": 128}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "DEparrow hub API",
            "version": "1",
            "description": "Amounts are decimal strings of credits (6 decimals).",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "nodeBasic": {"type": "http", "scheme": "basic"},
            },
        },
    }
