"""Network diagnosis: one pass/fail line per check, and a hint on every failure.

Used by `edge-run diagnose` (with the node's node.json) and by the hub's CLI
(`deparrow network diagnose`, `deparrow status --deep`, through hub/diagnose.py), so a node
owner and a submitter read the same lines. It lives in edge/ because edge/ never imports hub/
and a node image need not carry the hub. CPython only (sockets, urllib, paho), like
edge/mqtt_paho.py: a board never runs it.

Checks, in order: DNS of the hub's host; the hub's HTTP API; the hub's own link to its broker;
clock skew against the hub; HTTP round trip; the caller's credentials at the hub; DNS of the
broker's host (when another); broker TCP; MQTT login; MQTT round trip (publish, receive the
echo on a topic the caller may use).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import secrets
import socket
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import Message
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from edge import protocol

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
    """Where the user fixes each input: a flag on the CLI, a field of node.json."""

    def __init__(self, hub: str, mqtt: str, login: str, hub_auth: str) -> None:
        self.hub = hub
        self.mqtt = mqtt
        self.login = login
        self.hub_auth = hub_auth


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


# --- low-level probes ----------------------------------------------------------------------
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
    url: str, timeout_s: float, headers: dict[str, str] | None = None
) -> tuple[int, bytes, Message, float]:
    """(status, body, headers, milliseconds). HTTP errors are answers, not exceptions;
    unreachable hosts raise OSError (urllib.error.URLError is one)."""
    req = urllib.request.Request(url, headers=headers or {})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
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


def split_mqtt_url(url: str) -> tuple[str, int]:
    """(host, port) of an mqtt:// URL; ValueError naming the problem."""
    if not isinstance(url, str):
        raise ValueError(f"the MQTT URL must be a string, not {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise ValueError(f"the MQTT URL must look like mqtt://host:port, not {url!r}")
    try:
        return parts.hostname, parts.port or 1883
    except ValueError:
        raise ValueError(f"the MQTT URL {url!r} has an invalid port") from None


# --- checks ----------------------------------------------------------------------------------
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


def check_hub(hub_url: str, timeout_s: float, hint: str) -> tuple[Check, HubAnswer | None]:
    name = f"hub HTTP {hub_url}"
    url = hub_url.rstrip("/") + "/api/v1/status"
    t0 = time.time()
    try:
        code, body, headers, ms = http_get(url, timeout_s)
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
    hub_url: str, first_ms: float, timeout_s: float, max_ms: float = MAX_ROUND_TRIP_MS
) -> Check:
    """Median of three GETs of the status (the first one already done)."""
    samples = [first_ms]
    url = hub_url.rstrip("/") + "/api/v1/status"
    for _ in range(2):
        try:
            samples.append(http_get(url, timeout_s)[3])
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


def check_tcp(host: str, port: int, timeout_s: float, hint: str) -> Check:
    name = f"broker TCP {host}:{port}"
    start = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        return Check(name, FAIL, why(e, timeout_s), f"is the hub's broker running? {hint}")
    ms = (time.perf_counter() - start) * 1000
    return Check(name, OK, f"connected in {ms:.1f} ms", ms=ms)


def check_mqtt(
    host: str,
    port: int,
    username: str | None,
    password: str | None,
    client_id: str,
    topic: str,
    timeout_s: float,
    hints: Hints,
    max_ms: float = MAX_ROUND_TRIP_MS,
) -> list[Check]:
    """Log in (CONNECT with these credentials), then publish on `topic` and wait for our own
    message to come back: [login, round trip]."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    login = f"MQTT login as {username or 'anonymous'}"
    trip = f"MQTT round trip on {topic}"
    seen: dict[str, Any] = {}
    nonce = secrets.token_hex(8).encode()

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        seen["connack"] = rc

    def on_subscribe(_c: Any, _u: Any, _mid: Any, codes: Any, _p: Any) -> None:
        seen["suback"] = list(codes)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if bytes(msg.payload) == nonce:
            seen["echo"] = time.perf_counter()

    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True
    )
    if username:
        c.username_pw_set(username, password)
    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = on_message

    def pump(key: str) -> bool:
        """Run the network loop until `key` is seen; False on timeout or a lost connection."""
        deadline = time.monotonic() + timeout_s
        while key not in seen and time.monotonic() < deadline:
            if c.loop(0.02) != mqtt.MQTT_ERR_SUCCESS and key not in seen:
                seen["lost"] = True
                return False
        return key in seen

    skip = Check(trip, SKIP, "not logged in to the broker")
    try:
        try:
            c.connect(host, port, keepalive=max(10, int(timeout_s) * 2))
        except (OSError, ValueError) as e:
            return [Check(login, FAIL, why(e, timeout_s), hints.mqtt), skip]
        if not pump("connack"):
            detail = (
                "the broker closed the connection without answering the MQTT login"
                if seen.get("lost")
                else f"no answer to the MQTT login within {timeout_s:g} s"
            )
            return [Check(login, FAIL, detail, f"is {host}:{port} an MQTT broker? {hints.mqtt}"),
                    skip]  # fmt: skip
        rc = seen["connack"]
        if rc.is_failure:
            return [Check(login, FAIL, f"refused by the broker: {rc}", hints.login), skip]
        checks = [Check(login, OK, "accepted")]
        c.subscribe(topic, qos=1)
        if not pump("suback"):
            return [*checks, Check(trip, FAIL, "the broker did not confirm the subscription",
                                   hints.mqtt)]  # fmt: skip
        if any(getattr(code, "is_failure", False) for code in seen["suback"]):
            return [*checks, Check(
                trip, FAIL, f"the broker refused to subscribe us to {topic}",
                "the broker's ACL should let this login read and write its own topics",
            )]  # fmt: skip
        start = time.perf_counter()
        c.publish(topic, nonce, qos=1)
        if not pump("echo"):
            return [*checks, Check(
                trip, FAIL, f"published, but nothing came back within {timeout_s:g} s",
                "the broker's ACL may keep this login from writing or reading " + topic,
            )]  # fmt: skip
        ms = (seen["echo"] - start) * 1000
        detail = f"{ms:.1f} ms (publish, receive our echo; QoS 1)"
        if ms > max_ms:
            return [*checks, Check(
                trip, FAIL, detail + f", over {max_ms:g} ms",
                "a slow path to the broker: assignments and results will be late", ms=ms,
            )]  # fmt: skip
        return [*checks, Check(trip, OK, detail, ms=ms)]
    finally:
        try:
            c.disconnect()
            c.loop(0.01)
        except Exception:  # already closed by the broker: nothing to tidy
            pass


# --- whole runs ------------------------------------------------------------------------------
AuthStep = Callable[[HubAnswer | None], tuple[Check, str]]


def broker_url_from(answer: HubAnswer | None, hub_url: str) -> str | None:
    """The broker URL the hub gives out: its public one, else its own with a wildcard or
    loopback host replaced by the host we reached the hub at."""
    if answer is None:
        return None
    broker = answer.status.get("broker") or {}
    url = broker.get("public_url") or broker.get("url")
    if not isinstance(url, str):
        return None
    try:
        host, port = split_mqtt_url(url)
    except ValueError:
        return None
    hub_host = split_hub_url(hub_url)[0]
    if host in ("0.0.0.0", "::") or (host in ("127.0.0.1", "localhost", "::1") and not
                                      broker.get("public_url")):  # fmt: skip
        host = hub_host
    return f"mqtt://{host}:{port}"


def run_checks(
    hub_url: str,
    *,
    mqtt_url: str | None,
    username: str | None,
    password: str | None,
    client_id: str,
    auth: AuthStep,
    hints: Hints,
    timeout_s: float = 5.0,
    max_skew_s: float = MAX_SKEW_S,
) -> list[Check]:
    """Every check, in order. mqtt_url None: the broker the hub advertises.
    `auth` checks the caller's credentials at the hub and names the echo topic."""
    hub_host, hub_port = split_hub_url(hub_url)
    checks = [check_dns(hub_host, hub_port, f"check the host name; {hints.hub}")]
    hub_check, answer = check_hub(hub_url, timeout_s, hints.hub)
    checks.append(hub_check)
    if answer is None:
        gone = "the hub did not answer"
        checks += [Check("hub's broker link", SKIP, gone), Check("clock", SKIP, gone),
                   Check("HTTP round trip", SKIP, gone)]  # fmt: skip
    else:
        checks.append(check_hub_broker(answer))
        when = server_time(answer)
        if when is None:
            checks.append(Check("clock", FAIL, "the hub sent no time to compare with",
                                "an old hub? upgrade it"))  # fmt: skip
        else:
            checks.append(check_clock(when[0], when[1], answer.t0, answer.t1, max_skew_s))
        checks.append(check_http_round_trip(hub_url, answer.ms, timeout_s))
    auth_check, topic = auth(answer)
    checks.append(auth_check)
    url = mqtt_url or broker_url_from(answer, hub_url)
    if url is None:
        why_not = "no broker address: the hub did not give one (pass --mqtt URL)"
        for name in ("broker TCP", "MQTT login", "MQTT round trip"):
            checks.append(Check(name, SKIP, why_not))
        return checks
    host, port = split_mqtt_url(url)
    if host != hub_host:
        checks.append(check_dns(host, port, f"check the host name; {hints.mqtt}"))
    tcp = check_tcp(host, port, timeout_s, hints.mqtt)
    checks.append(tcp)
    if tcp.status != OK:
        checks += [Check(f"MQTT login as {username or 'anonymous'}", SKIP, "broker unreachable"),
                   Check(f"MQTT round trip on {topic}", SKIP, "broker unreachable")]  # fmt: skip
        return checks
    checks += check_mqtt(host, port, username, password, client_id, topic, timeout_s, hints)
    return checks


def _diag_client_id(base: str) -> str:
    # Never the node's own client id: the broker would drop the running node to let us in.
    return f"{base}-diag-{secrets.token_hex(3)}"


def node_checks(
    config: dict[str, Any], source: str, timeout_s: float = 5.0, max_skew_s: float = MAX_SKEW_S
) -> list[Check]:
    """Diagnose a node from its node.json (`source` names the file in hints).
    ValueError when node.json lacks what the checks need."""
    node_id = config.get("node_id")
    mqtt = config.get("mqtt")
    hub = config.get("hub")
    if not isinstance(node_id, str) or not node_id:
        raise ValueError(f"{source} has no node_id; remove it to re-enroll")
    if not isinstance(hub, str):
        raise ValueError(f"{source} has no hub URL; remove it to re-enroll")
    split_hub_url(hub)
    if not isinstance(mqtt, dict) or not isinstance(mqtt.get("url"), str):
        raise ValueError(f"{source} has no mqtt.url; remove it to re-enroll")
    split_mqtt_url(mqtt["url"])
    username = mqtt.get("username")
    password = mqtt.get("password")
    if username is not None and not isinstance(username, str):
        raise ValueError(f"{source}: mqtt.username must be a string")
    if password is not None and not isinstance(password, str):
        raise ValueError(f"{source}: mqtt.password must be a string")
    reenroll = (
        f"re-enroll: remove {source} and run edge-run --hub URL --token TOKEN "
        "(a token from 'deparrow node token')"
    )
    hints = Hints(
        hub=f"the hub URL is 'hub' in {source}",
        mqtt=f"the broker URL is mqtt.url in {source}; a firewall may block its port",
        login=f"the broker does not take this node's credentials; {reenroll}",
        hub_auth=f"the hub does not know this node (was its database reset?); {reenroll}",
    )

    def auth(answer: HubAnswer | None) -> tuple[Check, str]:
        topic = protocol.node_topic(node_id, DIAG_KIND)
        name = f"hub knows node {node_id}"
        if answer is None:
            return Check(name, SKIP, "the hub did not answer"), topic
        token = base64.b64encode(f"{node_id}:{password or ''}".encode()).decode()
        url = hub.rstrip("/") + "/api/v1/nodes/" + node_id
        try:
            code, body, _, _ = http_get(url, timeout_s, {"Authorization": "Basic " + token})
        except (OSError, ValueError) as e:
            return Check(name, FAIL, why(e, timeout_s), "the hub stopped answering"), topic
        try:
            data = json.loads(body)
        except ValueError:
            data = {}
        if code == 200 and isinstance(data, dict):
            return Check(
                name, OK, f"state {data.get('state')}, earned {data.get('earned')} credits"
            ), topic
        message = data.get("error") if isinstance(data, dict) else None
        return Check(name, FAIL, f"HTTP {code}: {message or 'refused'}", hints.hub_auth), topic

    return run_checks(
        hub,
        mqtt_url=mqtt["url"],
        username=username,
        password=password,
        client_id=_diag_client_id(node_id),
        auth=auth,
        hints=hints,
        timeout_s=timeout_s,
        max_skew_s=max_skew_s,
    )
