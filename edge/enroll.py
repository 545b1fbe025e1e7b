"""Enrollment over HTTP, for the CPython tools that enroll a node: `edge-run`, `deparrow board
provision` and firmware/provision.py. One POST to the hub's /api/v1/nodes/enroll; its answer
becomes the node's identity, node.json (what every node, MicroPython ones too, reads).

Over HTTPS the node trusts the hub by a pin (docs/tls.md): the enrollment command carries the
fingerprint of the hub's CA (`--ca sha256:...`); the node fetches the CA from the hub without
trusting anything, keeps it only when its fingerprint is that one, and from then on verifies
the hub (HTTPS and MQTT over TLS) against it and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

PIN_PREFIX = "sha256:"
CA_PATH = "/api/v1/tls/ca"


class EnrollError(Exception):
    """The hub refused the enrollment, or could not be reached; the message says which."""


def is_pin(ca: str) -> bool:
    """Whether --ca is a fingerprint ("sha256:<64 hex>") rather than a file."""
    return ca.lower().startswith(PIN_PREFIX)


def normalize_pin(pin: str) -> str:
    """sha256: and 64 lowercase hex digits (colons, as openssl prints them, allowed); else
    ValueError."""
    digits = pin[len(PIN_PREFIX) :].replace(":", "").strip().lower()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError(
            f"{pin!r} is not a certificate fingerprint: expected sha256: and 64 hex digits, "
            "as `deparrow node token` prints it"
        )
    return PIN_PREFIX + digits


def pem_fingerprint(pem: str) -> str:
    """The fingerprint of the first certificate in a PEM text: sha256 of its DER bytes."""
    begin = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        raise ValueError("no PEM certificate in it")
    der = ssl.PEM_cert_to_DER_cert(pem[begin : end + len("-----END CERTIFICATE-----")])
    return PIN_PREFIX + hashlib.sha256(der).hexdigest()


def read_ca_pem(path: str) -> str:
    """The PEM of a CA file given as --ca FILE; EnrollError naming what is wrong with it."""
    try:
        with open(path) as f:
            pem = f.read()
        pem_fingerprint(pem)
    except OSError as e:
        raise EnrollError(f"cannot read the CA file {path}: {e.strerror or e}") from None
    except ValueError:
        raise EnrollError(
            f"{path} holds no PEM certificate; --ca takes the hub's CA file or the sha256: "
            "fingerprint 'deparrow node token' prints"
        ) from None
    return pem


def tls_context(ca_file: str | None = None, ca_pem: str | None = None) -> ssl.SSLContext:
    """A client context that verifies the hub: against the pinned CA alone when given (a file
    or PEM text; partial chains are accepted, so a pinned server certificate is enough too),
    else against the system's CAs (a hub with a Let's Encrypt certificate)."""
    ctx = ssl.create_default_context(cafile=ca_file, cadata=ca_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None or ca_pem is not None:
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


# OpenSSL's verify codes for a certificate that is trusted but names another host
NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def untrusted(e: ssl.SSLCertVerificationError, url: str, pinned: bool) -> str:
    """Why a hub's (or broker's) certificate was refused, and what to do, in words."""
    host = urlsplit(url).hostname or url
    if e.verify_code in NAME_MISMATCH:
        return (
            f"its certificate does not name {host}: start the hub with --tls-name {host} (it "
            "then issues itself a certificate for that name too, and pins stay valid), or "
            "reach it by a name its certificate has"
        )
    if pinned:
        return (
            f"its certificate is not from the CA given with --ca ({e.verify_message}): is "
            "this the hub that CA belongs to?"
        )
    return (
        f"its certificate is not trusted ({e.verify_message}): pass --ca with the hub's CA "
        "file or the sha256: fingerprint `deparrow node token` prints"
    )


def fetch_ca(hub: str, pin: str, dest: str, timeout_s: float = 15.0) -> str:
    """Fetch the hub's CA, keep it at dest only if its fingerprint is pin; returns dest.
    EnrollError otherwise, and nothing is written."""
    pem = fetch_ca_pem(hub, pin, timeout_s)
    tmp = dest + ".tmp"
    with open(tmp, "w") as f:
        f.write(pem)
    os.replace(tmp, dest)
    return dest


def fetch_ca_pem(hub: str, pin: str, timeout_s: float = 15.0) -> str:
    """The hub's CA (PEM), fetched without verifying the connection and returned only if its
    fingerprint is pin. EnrollError otherwise."""
    if not hub.lower().startswith("https://"):
        raise EnrollError(f"--ca pins the certificate of an https:// hub; {hub} is not one")
    try:
        pin = normalize_pin(pin)
    except ValueError as e:
        raise EnrollError(str(e)) from None
    # No verification here on purpose: what we get is checked against the pin below, so a
    # man in the middle can only make this fail, never make us trust him.
    blind = ssl.create_default_context()
    blind.check_hostname = False
    blind.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(
            hub.rstrip("/") + CA_PATH, timeout=timeout_s, context=blind
        ) as resp:
            pem = resp.read(64 * 1024).decode("ascii", "replace")
    except urllib.error.HTTPError as e:
        raise EnrollError(
            f"the hub at {hub} does not hand out its CA ({e.code}): is it started with --tls?"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        raise EnrollError(f"cannot reach the hub at {hub}: {getattr(e, 'reason', e)}") from None
    try:
        got = pem_fingerprint(pem)
    except ValueError:
        raise EnrollError(f"the hub at {hub} answered {CA_PATH} without a certificate") from None
    if got != pin:
        raise EnrollError(
            f"the hub at {hub} presents a CA with fingerprint {got}, not {pin} as --ca says: "
            "refusing to trust it, nothing was sent to it. Check the fingerprint `deparrow "
            "node token` printed (a copy error, or another machine answering at that address)"
        )
    return pem


def node_config(hub: str, answer: dict[str, Any], ca: str | None = None) -> dict[str, Any]:
    """node.json: the hub's enroll answer, plus the hub it came from (and the CA it pinned)."""
    config = {
        "hub": hub,
        "node_id": answer["node_id"],
        "node_secret": answer["node_secret"],
        "owner": answer["owner"],
        "mqtt": answer["mqtt"],
        "heartbeat_interval_s": answer["heartbeat_interval_s"],
    }
    if ca is not None:
        config["ca"] = ca
    return config


def enroll(
    hub: str, body: dict[str, Any], timeout_s: float = 15.0, ca: str | None = None
) -> dict[str, Any]:
    """POST body (token, name, engines, arch, cpu, memory_mb) to the hub; the node.json.
    ca: the CA file to verify an https:// hub with (None: the system's CAs)."""
    req = urllib.request.Request(
        hub.rstrip("/") + "/api/v1/nodes/enroll",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    context = tls_context(ca) if hub.lower().startswith("https://") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=context) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error") or e.reason
        except (ValueError, AttributeError):
            message = e.reason
        raise EnrollError(f"the hub refused enrollment ({e.code}): {message}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLCertVerificationError):
            why = untrusted(reason, hub, ca is not None)
            raise EnrollError(f"cannot enroll with the hub at {hub}: {why}") from None
        raise EnrollError(f"cannot reach the hub at {hub}: {reason}") from None
    try:
        return node_config(hub, answer, ca)
    except (KeyError, TypeError):
        raise EnrollError(f"{hub} answered the enrollment without a node identity") from None
