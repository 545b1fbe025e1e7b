"""The hub's bootstrap list, for the CPython tools: GET /api/v1/bootstrap from the first of
several URLs that answers (docs/protocol.md, "Bootstrap and failover").

A bootstrap URL is a hub replica's URL (`http://hub:8765`), or several, comma-separated; any
live replica serves the list, so a client that knows the replicas asks them in turn. The
list's order is the hub's: best first (the asked-for region, then the least loaded).

edge-run (edge/node_failover.py) takes the brokers from it; the deparrow CLI and SDK
(deparrow/bootstrap.py) the replicas.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

PATH = "/api/v1/bootstrap"


class BootstrapError(OSError):
    """No bootstrap URL answered with a list; the message names each and why."""


def base_urls(urls: str | Iterable[str]) -> list[str]:
    """Replica URLs from a comma-separated text or a list: without a trailing slash or the
    bootstrap path, each once, in order."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for url in items:
        url = url.strip().rstrip("/")
        if url.endswith(PATH):
            url = url[: -len(PATH)]
        if not url:
            continue
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"a bootstrap URL is a hub's http(s):// URL, not {url!r}")
        if url not in out:
            out.append(url)
    return out


def fetch_one(
    url: str,
    region: str | None = None,
    timeout_s: float = 10.0,
    context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """The list from one replica; OSError (urllib's URLError is one) when it does not answer,
    ValueError when its answer is not a bootstrap list."""
    query = "?region=" + quote(region, safe="") if region else ""
    req = urllib.request.Request(url + PATH + query, headers={"Accept": "application/json"})
    use = context if url.startswith("https://") else None
    with urllib.request.urlopen(req, timeout=timeout_s, context=use) as resp:
        body = json.loads(resp.read())
    if not isinstance(body, dict) or not isinstance(body.get("replicas"), list):
        raise ValueError(f"{url}{PATH} did not answer with a bootstrap list")
    return body


def fetch(
    urls: str | Iterable[str],
    region: str | None = None,
    timeout_s: float = 10.0,
    context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """The list from the first of urls that answers; BootstrapError naming why each failed."""
    problems: list[str] = []
    for url in base_urls(urls):
        try:
            return fetch_one(url, region, timeout_s, context)
        except urllib.error.HTTPError as e:
            problems.append(f"{url}: HTTP {e.code}")
        except (OSError, ValueError) as e:
            problems.append(f"{url}: {getattr(e, 'reason', e)}")
    raise BootstrapError(
        "no bootstrap URL answered with the hub's replicas ("
        + ("; ".join(problems) or "none given")
        + ")"
    )


def replica_urls(answer: dict[str, Any]) -> list[str]:
    return [str(r["url"]).rstrip("/") for r in answer.get("replicas") or [] if r.get("url")]


def broker_urls(answer: dict[str, Any]) -> list[str]:
    return [str(b["url"]) for b in answer.get("brokers") or [] if b.get("url")]
