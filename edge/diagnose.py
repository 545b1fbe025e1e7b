"""Network diagnosis: one pass/fail line per check, and a hint on every failure.

Used by `edge-run diagnose` (with the node's node.json) and by the hub's CLI
(`deparrow network diagnose`, `deparrow status --deep`, through deparrow/diagnose.py), so a node
owner and a submitter read the same lines. It lives in edge/ because edge/ never imports hub/
and a node image need not carry the hub. CPython only (sockets, urllib, paho), like
edge/mqtt_paho.py: a board never runs it.

Checks, in order: DNS of the hub's host; the hub's certificate (https:// hubs); the hub's HTTP
API; the hub's own link to its broker; clock skew against the hub; HTTP round trip; the
caller's credentials at the hub; DNS of the broker's host (when another); broker TCP; the
broker's certificate (mqtts://); MQTT login; MQTT round trip (publish, receive the echo on a
topic the caller may use).

The checks live by family: edge/diagnose_report.py (the report's types and shared probes),
edge/diagnose_hub.py (HTTP to the hub, clock), edge/diagnose_tls.py (certificates) and
edge/diagnose_broker.py (MQTT); this module runs them in order, for a node (node_checks) or
for any caller (run_checks).
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
from collections.abc import Callable
from typing import Any

from edge.core import protocol
from edge.diagnose_broker import check_mqtt, check_tcp
from edge.diagnose_hub import (
    check_clock,
    check_http_round_trip,
    check_hub,
    check_hub_broker,
    server_time,
)
from edge.diagnose_report import (
    DIAG_KIND,
    FAIL,
    MAX_ROUND_TRIP_MS,
    MAX_SKEW_S,
    OK,
    SKIP,
    Check,
    Hints,
    HubAnswer,
    check_dns,
    http_get,
    hub_tls,
    mqtt_tls,
    passed,
    split_hub_url,
    split_mqtt_url,
    why,
)
from edge.diagnose_tls import Trust, check_tls

# Importable from here, as before the split (deparrow/diagnose.py, tests/test_diagnose.py).
__all__ = [
    "DIAG_KIND",
    "FAIL",
    "MAX_ROUND_TRIP_MS",
    "MAX_SKEW_S",
    "OK",
    "SKIP",
    "AuthStep",
    "Check",
    "Hints",
    "HubAnswer",
    "Trust",
    "broker_url_from",
    "check_clock",
    "check_dns",
    "check_http_round_trip",
    "check_hub",
    "check_hub_broker",
    "check_mqtt",
    "check_tcp",
    "check_tls",
    "http_get",
    "node_checks",
    "passed",
    "run_checks",
    "server_time",
    "split_hub_url",
    "split_mqtt_url",
    "why",
]


# --- whole runs ------------------------------------------------------------------------------
# Checks the caller's credentials at the hub (an https:// one verified with the context given)
# and names the echo topic.
AuthStep = Callable[[HubAnswer | None, ssl.SSLContext | None], tuple[Check, str]]


def broker_url_from(answer: HubAnswer | None, hub_url: str) -> str | None:
    """The broker URL the hub gives out: its public one, else its own with a wildcard or
    loopback host replaced by the host we reached the hub at; mqtts:// stays mqtts://."""
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
    scheme = "mqtts" if mqtt_tls(url) else "mqtt"
    return f"{scheme}://{_url_host(host)}:{port}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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
    ca: str | None = None,
    in_use: Callable[[], str | None] | None = None,
) -> list[Check]:
    """Every check, in order. mqtt_url None: the broker the hub advertises.
    in_use: asked after `auth`, why the login must not be tried now on the broker the hub gives
    out (None: try it): a login holds one connection, so logging in as a running node there
    would close the node's.
    `auth` checks the caller's credentials at the hub and names the echo topic. ca: what an
    https:// hub and an mqtts:// broker are verified with: a PEM file, a sha256: pin, or None
    for the system's CAs (edge/diagnose_tls.py)."""
    hub_host, hub_port = split_hub_url(hub_url)
    trust = Trust(ca, hub_url, timeout_s)
    checks = [check_dns(hub_host, hub_port, f"check the host name; {hints.hub}")]
    context = None
    answer = None
    tls = None
    if hub_tls(hub_url):
        tls = check_tls("hub", hub_host, hub_port, trust, timeout_s, hints.tls)
        checks.append(tls)
        if tls.status == OK:
            context = trust.context()
    if tls is not None and tls.status == FAIL:
        checks.append(Check(f"hub HTTP {hub_url}", SKIP, "the hub's certificate is not trusted"))
    else:
        hub_check, answer = check_hub(hub_url, timeout_s, hints.hub, context)
        checks.append(hub_check)
    if answer is None:
        gone = "the hub did not answer" if checks[-1].status != SKIP else checks[-1].detail
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
        checks.append(check_http_round_trip(hub_url, answer.ms, timeout_s, context=context))
    auth_check, topic = auth(answer, context)
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
    login, trip = f"MQTT login as {username or 'anonymous'}", f"MQTT round trip on {topic}"
    if tcp.status != OK:
        return [*checks, Check(login, SKIP, "broker unreachable"),
                Check(trip, SKIP, "broker unreachable")]  # fmt: skip
    mqtt_context = None
    if mqtt_tls(url):
        tls = check_tls("broker", host, port, trust, timeout_s, hints.tls)
        checks.append(tls)
        if tls.status != OK:
            no_tls = "no trusted TLS connection to the broker"
            return [*checks, Check(login, SKIP, no_tls), Check(trip, SKIP, no_tls)]
        mqtt_context = trust.context()
    # only the broker the hub gives out holds the node's connection
    busy = in_use() if in_use is not None and url == broker_url_from(answer, hub_url) else None
    if busy:
        return [*checks, Check(login, SKIP, busy), Check(trip, SKIP, busy)]
    checks += check_mqtt(host, port, username, password, client_id, topic, timeout_s, hints,
                         context=mqtt_context)  # fmt: skip
    return checks


def _diag_client_id(base: str) -> str:
    # The hub's brokers use the login's name whatever we ask (one connection per login); an
    # outside broker keeps this one, which is never the running node's.
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
    ca = config.get("ca")
    if ca is not None and (not isinstance(ca, str) or not ca):
        raise ValueError(f"{source}: ca must be the path of the hub's CA file")
    reenroll = (
        f"re-enroll: remove {source} and run edge-run --hub URL --token TOKEN "
        "(a token from 'deparrow node token')"
    )
    if ca is not None:
        tls = (
            f"this node trusts only the CA in {ca} ({source}'s 'ca', pinned at enrollment): "
            "if the hub made a new CA (its tls/ folder was removed), re-enroll: remove "
            f"{source} and run the command 'deparrow node token' prints (its --ca sha256:...)"
        )
    else:
        tls = (
            f"{source} pins no CA ('ca'), so the system's CAs are used: re-enroll with the "
            "command 'deparrow node token' prints (its --ca sha256:...) against a hub with "
            "its own CA"
        )
    hints = Hints(
        hub=f"the hub URL is 'hub' in {source}",
        mqtt=f"the broker URL is mqtt.url in {source}; a firewall may block its port",
        login=f"the broker does not take this node's credentials; {reenroll}",
        hub_auth=f"the hub does not know this node (was its database reset?); {reenroll}",
        tls=tls,
    )

    seen: dict[str, Any] = {}  # the node's record, as the hub answered it

    def auth(answer: HubAnswer | None, context: ssl.SSLContext | None) -> tuple[Check, str]:
        topic = protocol.node_topic(node_id, DIAG_KIND)
        name = f"hub knows node {node_id}"
        if answer is None:
            return Check(name, SKIP, "the hub did not answer"), topic
        token = base64.b64encode(f"{node_id}:{password or ''}".encode()).decode()
        url = hub.rstrip("/") + "/api/v1/nodes/" + node_id
        try:
            code, body, _, _ = http_get(
                url, timeout_s, {"Authorization": "Basic " + token}, context
            )
        except (OSError, ValueError) as e:
            return Check(name, FAIL, why(e, timeout_s), "the hub stopped answering"), topic
        try:
            data = json.loads(body)
        except ValueError:
            data = {}
        if code == 200 and isinstance(data, dict):
            seen["state"] = data.get("state")
            return Check(
                name, OK, f"state {data.get('state')}, earned {data.get('earned')} credits"
            ), topic
        message = data.get("error") if isinstance(data, dict) else None
        return Check(name, FAIL, f"HTTP {code}: {message or 'refused'}", hints.hub_auth), topic

    def in_use() -> str | None:
        state = seen.get("state")
        if state in (None, "offline"):
            return None
        return (
            f"the node is connected now (the hub has it {state}): a login holds one connection,"
            " so logging in as it would close the node's; that the hub hears it shows the login"
            " works (stop the node to check it here)"
        )

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
        ca=ca,
        in_use=in_use,
    )
