"""Enrollment over HTTP, for the CPython tools that enroll a node: `edge-run`, `deparrow board
provision` and firmware/provision.py. One POST to the hub's /api/v1/nodes/enroll; its answer
becomes the node's identity, node.json (what every node, MicroPython ones too, reads)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class EnrollError(Exception):
    """The hub refused the enrollment, or could not be reached; the message says which."""


def node_config(hub: str, answer: dict[str, Any]) -> dict[str, Any]:
    """node.json: the hub's enroll answer, plus the hub it came from."""
    return {
        "hub": hub,
        "node_id": answer["node_id"],
        "node_secret": answer["node_secret"],
        "owner": answer["owner"],
        "mqtt": answer["mqtt"],
        "heartbeat_interval_s": answer["heartbeat_interval_s"],
    }


def enroll(hub: str, body: dict[str, Any], timeout_s: float = 15.0) -> dict[str, Any]:
    """POST body (token, name, engines, arch, cpu, memory_mb) to the hub; the node.json."""
    req = urllib.request.Request(
        hub.rstrip("/") + "/api/v1/nodes/enroll",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error") or e.reason
        except (ValueError, AttributeError):
            message = e.reason
        raise EnrollError(f"the hub refused enrollment ({e.code}): {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise EnrollError(f"cannot reach the hub at {hub}: {getattr(e, 'reason', e)}") from None
    try:
        return node_config(hub, answer)
    except (KeyError, TypeError):
        raise EnrollError(f"{hub} answered the enrollment without a node identity") from None
