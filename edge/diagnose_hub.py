"""The diagnosis's checks against the hub over HTTP: its status, its link to its broker, the
clock against the hub's, and the HTTP round trip."""

from __future__ import annotations

import json
import ssl
import statistics
import time
from email.utils import parsedate_to_datetime

from edge.diagnose_report import (
    FAIL,
    MAX_ROUND_TRIP_MS,
    MAX_SKEW_S,
    OK,
    Check,
    HubAnswer,
    http_get,
    why,
)


def check_hub(
    hub_url: str, timeout_s: float, hint: str, context: ssl.SSLContext | None = None
) -> tuple[Check, HubAnswer | None]:
    """GET /api/v1/status. context: how an https:// hub is verified (edge/diagnose_tls.py)."""
    name = f"hub HTTP {hub_url}"
    url = hub_url.rstrip("/") + "/api/v1/status"
    t0 = time.time()
    try:
        code, body, headers, ms = http_get(url, timeout_s, context=context)
    except (OSError, ValueError) as e:
        hint = f"is the hub running at {hub_url}? {hint}"
        return Check(name, FAIL, why(e, timeout_s), hint), None
    t1 = time.time()
    if code != 200:
        return Check(
            name, FAIL, f"GET /api/v1/status answered HTTP {code}",
            f"is {hub_url} a DEparrow hub? {hint}",
        ), None  # fmt: skip
    try:
        status = json.loads(body)
        if not isinstance(status, dict) or status.get("hub") != "ok":
            raise ValueError("no hub field")
    except ValueError:
        return Check(
            name, FAIL, "answered, but not with a DEparrow hub's status",
            f"is {hub_url} a DEparrow hub? {hint}",
        ), None  # fmt: skip
    version = status.get("version")
    return (
        Check(name, OK, f"answers (API v{version}, {ms:.1f} ms)", ms=ms),
        HubAnswer(status, headers, t0, t1, ms),
    )


def check_hub_broker(answer: HubAnswer) -> Check:
    broker = answer.status.get("broker") or {}
    url = broker.get("url", "?")
    if broker.get("connected"):
        return Check("hub's broker link", OK, f"the hub is connected to its broker at {url}")
    return Check(
        "hub's broker link", FAIL, f"the hub is not connected to its broker at {url}",
        "nodes get no jobs until it reconnects: look at the hub's log, check its --mqtt broker",
    )  # fmt: skip


def server_time(answer: HubAnswer) -> tuple[float, float] | None:
    """(the hub's time, its resolution in seconds): the status's `time` field when the hub
    sends one, else the HTTP Date header (whole seconds)."""
    t = answer.status.get("time")
    if isinstance(t, int | float) and not isinstance(t, bool):
        return float(t), 0.0
    date = answer.headers.get("Date")
    if date:
        try:
            return parsedate_to_datetime(date).timestamp(), 1.0
        except (TypeError, ValueError):
            return None
    return None


def check_clock(
    hub_time: float, resolution_s: float, t0: float, t1: float, max_skew_s: float = MAX_SKEW_S
) -> Check:
    """Compare the hub's clock, read between t0 and t1 (local), with ours."""
    skew = (t0 + t1) / 2 - hub_time  # > 0: we are ahead
    slack = (t1 - t0) / 2 + resolution_s
    side = "ahead of" if skew > 0 else "behind"
    if abs(skew) - slack > max_skew_s:
        return Check(
            "clock", FAIL, f"this machine's clock is {abs(skew):.1f} s {side} the hub's",
            "turn on time sync (timedatectl set-ntp true, or chrony): expiry times and "
            "heartbeat stamps are read by the clock",
        )  # fmt: skip
    return Check("clock", OK, f"within {abs(skew) + slack:.2f} s of the hub's")


def check_http_round_trip(
    hub_url: str,
    first_ms: float,
    timeout_s: float,
    max_ms: float = MAX_ROUND_TRIP_MS,
    context: ssl.SSLContext | None = None,
) -> Check:
    """Median of three GETs of the status (the first one already done)."""
    samples = [first_ms]
    url = hub_url.rstrip("/") + "/api/v1/status"
    for _ in range(2):
        try:
            samples.append(http_get(url, timeout_s, context=context)[3])
        except (OSError, ValueError) as e:
            return Check("HTTP round trip", FAIL, why(e, timeout_s), "the hub stopped answering")
    ms = statistics.median(samples)
    detail = f"{ms:.1f} ms (median of {len(samples)})"
    if ms > max_ms:
        return Check(
            "HTTP round trip", FAIL, detail + f", over {max_ms:g} ms",
            "a slow path to the hub: assignments and results will be late", ms=ms,
        )  # fmt: skip
    return Check("HTTP round trip", OK, detail, ms=ms)
