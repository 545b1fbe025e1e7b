"""What a diagnosis reports, and what every check shares: the statuses, Check (one line of the
report), the hints, the hub's answer, and the low-level probes (errors in words, HTTP GET, URL
parsing, DNS). The checks are edge/diagnose_hub.py and edge/diagnose_broker.py; edge/diagnose.py
runs them in order."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
import urllib.error
import urllib.request
from email.message import Message
from typing import Any
from urllib.parse import urlsplit

OK = "ok"
FAIL = "FAIL"
SKIP = "skip"  # not run: a check it needs failed, or nothing to check with

MAX_SKEW_S = 5.0  # beyond this, expiry times (tokens, enrollment) and heartbeat stamps mislead
MAX_ROUND_TRIP_MS = 1000.0  # slower than this, assignments and results arrive visibly late
DIAG_KIND = "diag"  # the last topic level of the echo; the hub subscribes to no such topic


class Check:
    """One line of the report."""

    def __init__(
        self, name: str, status: str, detail: str, hint: str | None = None, ms: float | None = None
    ) -> None:
        self.name = name
        self.status = status
        self.detail = detail
        self.hint = hint
        self.ms = ms

    @property
    def ok(self) -> bool:
        return self.status != FAIL

    def line(self) -> str:
        text = f"{self.status:<6}{self.name}: {self.detail}"
        if self.status == FAIL and self.hint:
            text += " — " + self.hint
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "ok": self.ok,
            "detail": self.detail,
            "hint": self.hint if self.status == FAIL else None,
            "ms": None if self.ms is None else round(self.ms, 3),
        }

    def __repr__(self) -> str:
        return f"Check({self.line()!r})"


def passed(checks: list[Check]) -> bool:
    """True when no check failed (skipped ones only follow a failure or a missing input)."""
    return all(c.ok for c in checks)


class Hints:
    """Where the user fixes each input: a flag on the CLI, a field of node.json. tls: what to
    do when the hub's or the broker's certificate is not trusted by the CA the caller uses."""

    def __init__(
        self, hub: str, mqtt: str, login: str, hub_auth: str, tls: str = "pass the hub's CA"
    ) -> None:
        self.hub = hub
        self.mqtt = mqtt
        self.login = login
        self.hub_auth = hub_auth
        self.tls = tls


class HubAnswer:
    """What GET /api/v1/status told us, with the local times around the request."""

    def __init__(
        self, status: dict[str, Any], headers: Message, t0: float, t1: float, ms: float
    ) -> None:
        self.status = status
        self.headers = headers
        self.t0 = t0
        self.t1 = t1
        self.ms = ms


# --- low-level probes ----------------------------------------------------------------------------
def why(e: BaseException, timeout_s: float) -> str:
    """An OSError (or urllib's wrapper of one) in words a user acts on."""
    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException):
        return why(e.reason, timeout_s)
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, TimeoutError | socket.timeout):
        return f"no answer within {timeout_s:g} s"
    if isinstance(e, socket.gaierror):
        return f"host name does not resolve ({e.strerror})"
    if isinstance(e, ConnectionResetError):
        return "connection reset by the other side"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[:1].lower() + e.strerror[1:]
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


def http_get(
    url: str,
    timeout_s: float,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, bytes, Message, float]:
    """(status, body, headers, milliseconds). HTTP errors are answers, not exceptions;
    unreachable hosts raise OSError (urllib.error.URLError is one). context: how an https://
    hub is verified (edge/diagnose_tls.py)."""
    req = urllib.request.Request(url, headers=headers or {})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=context) as resp:
            body = resp.read()
            return resp.status, body, resp.headers, (time.perf_counter() - start) * 1000
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, body, e.headers, (time.perf_counter() - start) * 1000


def split_hub_url(url: str) -> tuple[str, int]:
    """(host, port) of an http(s) hub URL; ValueError naming the problem."""
    if not isinstance(url, str):
        raise ValueError(f"the hub URL must be a string, not {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the hub URL must look like http://host:port, not {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"the hub URL {url!r} has an invalid port") from None
    return parts.hostname, port


TLS_SCHEMES = ("mqtts", "ssl")  # MQTT over TLS, as edge/mqtt_paho.py takes it


def split_mqtt_url(url: str) -> tuple[str, int]:
    """(host, port) of an mqtt:// or mqtts:// URL (1883 and 8883 by default); ValueError
    naming the problem."""
    if not isinstance(url, str):
        raise ValueError(f"the MQTT URL must be a string, not {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp", *TLS_SCHEMES) or not parts.hostname:
        raise ValueError(
            f"the MQTT URL must look like mqtt://host:port or mqtts://host:port, not {url!r}"
        )
    try:
        return parts.hostname, parts.port or (8883 if mqtt_tls(url) else 1883)
    except ValueError:
        raise ValueError(f"the MQTT URL {url!r} has an invalid port") from None


def mqtt_tls(url: str) -> bool:
    """Whether an MQTT URL is MQTT over TLS (mqtts://)."""
    return urlsplit(url).scheme in TLS_SCHEMES


def hub_tls(url: str) -> bool:
    return urlsplit(url).scheme == "https"


# --- shared by the hub's and the broker's checks ---------------------------------------------
def check_dns(host: str, port: int, hint: str) -> Check:
    name = f"DNS {host}"
    try:
        ipaddress.ip_address(host)
        return Check(name, OK, "an IP address, nothing to resolve")
    except ValueError:
        pass
    start = time.perf_counter()
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) else str(e)
        return Check(name, FAIL, f"does not resolve ({reason})", hint)
    ms = (time.perf_counter() - start) * 1000
    addrs = sorted({str(i[4][0]) for i in infos})
    return Check(name, OK, f"resolves to {', '.join(addrs[:3])} ({ms:.1f} ms)", ms=ms)
