"""Request rate limits: a token bucket per caller, so one caller cannot take the hub's event
loop (or guess at logins) for everyone else.

Two kinds of bucket, checked before a request is handled:
- **logins** (`POST /api/v1/auth/token`, `POST /signin`, `POST /api/v1/nodes/enroll`), per
  client address: a few a second, for a burst of retries. Tokens are 128-bit random, so this
  is not about guessing them: each login costs a hash and a JWT, and a flood of them would
  crowd out everyone else.
- **every other request**, per caller: the bearer token it presents (its hash), or its address
  when it presents none.

A request over its bucket gets 429 with `Retry-After` (whole seconds) and a JSON error that says
which limit and when to come back. Loopback callers are exempt unless the operator says
otherwise: the hub's own tools and a reverse proxy in front of it talk from there (behind a
proxy every caller has the proxy's address; limit at the proxy then, docs/security.md). The
clock is injected: tests drive it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

LOGIN_PATHS = frozenset({"/api/v1/auth/token", "/signin", "/api/v1/nodes/enroll"})
MAX_BUCKETS = 100_000  # callers remembered; the least recently seen are forgotten first


@dataclass(frozen=True)
class Rate:
    """per_s requests a second on average, up to burst at once."""

    per_s: float
    burst: float


class Buckets:
    """Token buckets by key, refilled from an injected clock."""

    def __init__(self, rate: Rate, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.clock = clock
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """Take one token for key: 0.0 when there was one, else the seconds until there is."""
        now = self.clock()
        tokens, at = self._state.pop(key, (self.rate.burst, now))
        tokens = min(self.rate.burst, tokens + (now - at) * self.rate.per_s)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate.per_s
        self._state[key] = (tokens, now)
        if len(self._state) > MAX_BUCKETS:
            self._state.popitem(last=False)
        return wait


def _loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:  # a unix socket's peer, say
        return False


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware(
    requests: Rate | None,
    logins: Rate | None,
    exempt_loopback: bool = True,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The aiohttp middleware enforcing both limits (None: that one is off)."""
    per_caller = Buckets(requests, clock) if requests else None
    per_login = Buckets(logins, clock) if logins else None

    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        address = request.remote
        if exempt_loopback and _loopback(address):
            return await handler(request)
        if request.method == "POST" and request.path in LOGIN_PATHS:
            if per_login is None:
                return await handler(request)
            wait = per_login.take("login:" + str(address))
            rate = per_login.rate
            what = f"{rate.per_s:g} logins a second from one address (bursts of {rate.burst:g})"
        else:
            if per_caller is None:
                return await handler(request)
            auth = request.headers.get("Authorization", "")
            key = (
                "token:" + hashlib.sha256(auth.encode("utf-8", "replace")).hexdigest()
                if auth
                else "address:" + str(address)
            )
            wait = per_caller.take(key)
            who = "one token" if auth else "one address"
            rate = per_caller.rate
            what = f"{rate.per_s:g} requests a second from {who} (bursts of {rate.burst:g})"
        if wait <= 0:
            return await handler(request)
        retry = max(1, math.ceil(wait))
        return web.json_response(
            {"error": f"too many requests: the hub takes {what}; try again in {retry} s"},
            status=429,
            headers={"Retry-After": str(retry)},
        )

    return limit
