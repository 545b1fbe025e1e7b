"""Failover between hub replicas for the CLI and the SDK: a bootstrap URL gives the list
(GET /api/v1/bootstrap, edge/bootstrap.py), the client uses the first replica that answers,
and when a replica fails (refused, reset, timed out, 502/503/504) moves to the next one,
refreshing the list from whichever replica still answers.

What is sent again is only what is safe to send twice (`resendable`): a request that never
left (the connection was refused) always is; one that may have reached the failed replica is
sent again only when repeating it cannot do it twice: reads, a DELETE, a POST carrying an
Idempotency-Key (a job's submission, a transfer, a call), and the POSTs that are harmless to
repeat by nature (a token exchange, a content-addressed upload, a cancel). Anything else
fails with the original error, saying it may have been done.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import ssl
import time
import urllib.error
from collections.abc import Callable, Mapping
from typing import Any

from edge.bootstrap import base_urls, broker_urls, fetch, replica_urls

NOT_SENT = "not-sent"  # the request never reached a replica: always safe to send again
MAYBE_DONE = "maybe-done"  # it may have: send again only what is safe to repeat

RETRY_STATUSES = (502, 503, 504)
# POSTs that are harmless to repeat whatever their headers.
SAFE_POSTS = re.compile(r"^/api/v1/(auth/token|auth/node-token|blobs|jobs/[^/?]+/cancel)(\?.*)?$")


def failure(e: BaseException) -> str | None:
    """How a request failed, for failover: NOT_SENT, MAYBE_DONE, or None when another replica
    would not do better (the hub's own answer, a certificate it does not trust)."""
    if isinstance(e, urllib.error.HTTPError):
        return MAYBE_DONE if e.code in RETRY_STATUSES else None
    reason = getattr(e, "reason", e) if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, ssl.SSLCertVerificationError):
        return None
    if isinstance(reason, ConnectionRefusedError | socket.gaierror):
        return NOT_SENT
    if isinstance(reason, OSError | http.client.HTTPException | TimeoutError):
        return MAYBE_DONE  # reset, broken pipe, timed out, closed mid-answer
    return None


def resendable(method: str, path: str, headers: Mapping[str, str] | None = None) -> bool:
    """Whether sending this request twice cannot do it twice."""
    method = method.upper()
    if method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE"):
        return True
    if any(k.lower() == "idempotency-key" for k in (headers or {})):
        return True
    return method == "POST" and SAFE_POSTS.match(path) is not None


class Replicas:
    """The hub's replicas as bootstrap URLs list them, best first.

    sources: the bootstrap URL(s), comma-separated or a list. region: ask for this region's
    replicas first. fetch_list(urls) -> the hub's answer (edge.bootstrap.fetch by default;
    the CLI and SDK pass one that verifies TLS as they do)."""

    def __init__(
        self,
        sources: str | list[str],
        *,
        region: str | None = None,
        timeout_s: float = 10.0,
        fetch_list: Callable[[list[str]], dict[str, Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sources = base_urls(sources)
        if not self.sources:
            raise ValueError("a bootstrap URL is needed: the URL of any of the hub's replicas")
        self.region = region
        self.timeout_s = timeout_s
        self._fetch = fetch_list or (lambda urls: fetch(urls, region, timeout_s))
        self.clock = clock
        self.urls: list[str] = []
        self.brokers: list[str] = []  # the MQTT brokers the replicas give out, best first
        self.refresh_s = 30.0
        self.fetched_at: float | None = None

    def refresh(self, avoid: list[str] | tuple[str, ...] = ()) -> list[str]:
        """Fetch the list again: from the replicas known to be up first, then the bootstrap
        URLs, then those that just failed (they may be back). Raises edge.bootstrap's
        BootstrapError when none answers."""
        known = [u for u in self.urls if u not in avoid]
        order = known + [u for u in self.sources if u not in known and u not in avoid]
        order += [u for u in avoid if u not in order]
        answer = self._fetch(order)
        self.urls = replica_urls(answer)
        self.brokers = broker_urls(answer)
        self.refresh_s = float(answer.get("refresh_s") or self.refresh_s)
        self.fetched_at = self.clock()
        return list(self.urls)

    def first(self) -> str:
        """The best replica (the list fetched once); the first bootstrap URL's own address
        when the list is empty."""
        if self.fetched_at is None:
            self.refresh()
        return self.urls[0] if self.urls else self.sources[0]

    def next(self, tried: list[str]) -> str | None:
        """After a failure: the best replica not tried yet, from a fresh list when one can be
        had (else from the one known); None when every one was tried."""
        # When nobody answers the list, the replicas known may still answer requests.
        with contextlib.suppress(OSError):
            self.refresh(tuple(tried))
        for url in self.urls:
            if url not in tried:
                return url
        return None
