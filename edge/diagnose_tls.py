"""The diagnosis's TLS checks: does the hub (https://) or its broker (mqtts://) present a
certificate the caller trusts? The caller trusts what it would trust when it works: a node the
CA it pinned at enrollment (node.json's "ca"), a user the CLI's --ca (a PEM file or a sha256:
fingerprint, docs/tls.md), else the system's CAs. A certificate problem is a line of its own,
so a node owner never reads "hub down" when the hub is up and only its certificate is wrong.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import time

from edge.diagnose_report import FAIL, OK, SKIP, Check, why
from edge.enroll import (
    NAME_MISMATCH,
    EnrollError,
    fetch_ca_pem,
    is_pin,
    normalize_pin,
    pem_fingerprint,
    tls_context,
)

EXPIRED = 10  # OpenSSL's X509_V_ERR_CERT_HAS_EXPIRED


class TrustProblem(Exception):
    """The CA to verify with cannot be had: an unreadable file, a fingerprint that does not
    match what the hub hands out. The message says which."""


class Trust:
    """How the caller verifies the hub and its broker: ca is a PEM file, "sha256:<hex>" (the
    hub's CA is fetched once and kept only if it has that fingerprint), or None (the system's
    CAs). The context is made on first use, and so is the problem, once."""

    def __init__(self, ca: str | None, hub_url: str, timeout_s: float) -> None:
        self.ca = ca
        self.hub_url = hub_url
        self.timeout_s = timeout_s
        self._context: ssl.SSLContext | None = None
        self._problem: str | None = None
        self.source = "the system's CAs"

    def context(self) -> ssl.SSLContext:
        """The client context; TrustProblem when the CA cannot be had."""
        if self._problem is not None:
            raise TrustProblem(self._problem)
        if self._context is None:
            try:
                self._context = self._make()
            except TrustProblem as e:
                self._problem = str(e)
                raise
        return self._context

    def _make(self) -> ssl.SSLContext:
        ca = self.ca
        if ca is None:
            return tls_context()
        if is_pin(ca):
            try:
                pin = normalize_pin(ca)
                pem = fetch_ca_pem(self.hub_url, pin, self.timeout_s)
            except (ValueError, EnrollError) as e:
                raise TrustProblem(str(e)) from None
            self.source = f"the hub's CA pinned as {_short(pin)}"
            return tls_context(ca_pem=pem)
        try:
            with open(ca) as f:
                fingerprint = pem_fingerprint(f.read())
            context = tls_context(ca_file=ca)
        except OSError as e:  # ssl.SSLError is one too: a damaged certificate
            if isinstance(e, ssl.SSLError):
                raise TrustProblem(f"the CA file {ca} holds a damaged certificate") from None
            raise TrustProblem(f"cannot read the CA file {ca}: {e.strerror or e}") from None
        except ValueError:
            raise TrustProblem(f"the CA file {ca} holds no PEM certificate") from None
        self.source = f"the CA in {ca} ({_short(fingerprint)})"
        return context


def _short(fingerprint: str) -> str:
    return fingerprint[: len("sha256:") + 12] + "…"


def check_tls(what: str, host: str, port: int, trust: Trust, timeout_s: float, hint: str) -> Check:
    """A TLS handshake with host:port, verifying its certificate for host against `trust`.
    what names the server ("hub", "broker"); hint says what to do when the certificate is not
    trusted. A connection that cannot be made at all is skipped here: the next check (hub
    HTTP, or the broker TCP line before this one) says why, with its own hints."""
    name = f"{what} TLS {host}:{port}"
    start = time.perf_counter()
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as e:
        return Check(name, SKIP, f"no connection ({why(e, timeout_s)})")
    try:
        try:
            context = trust.context()
        except TrustProblem as e:
            return Check(name, FAIL, str(e), hint)
        with context.wrap_socket(raw, server_hostname=host) as tls:
            cert = tls.getpeercert() or {}
            version = tls.version() or "TLS"
    except ssl.SSLCertVerificationError as e:
        return _untrusted(name, host, e, trust, hint)
    except OSError as e:  # ssl.SSLError too: a server that does not speak TLS on this port
        reason = (e.reason or str(e)) if isinstance(e, ssl.SSLError) else why(e, timeout_s)
        return Check(
            name, FAIL, f"no TLS handshake ({reason})",
            f"is {host}:{port} a TLS port? A plain one is an http:// or mqtt:// URL",
        )  # fmt: skip
    finally:
        raw.close()
    ms = (time.perf_counter() - start) * 1000
    detail = f"{version}, certificate for {host} verified against {trust.source}"
    expires = cert.get("notAfter")
    if isinstance(expires, str):
        when = datetime.datetime.fromtimestamp(ssl.cert_time_to_seconds(expires), datetime.UTC)
        detail += f", valid until {when:%Y-%m-%d}"
    return Check(name, OK, detail + f" ({ms:.1f} ms)", ms=ms)


def _untrusted(
    name: str, host: str, e: ssl.SSLCertVerificationError, trust: Trust, hint: str
) -> Check:
    reason = e.verify_message or str(e)
    if e.verify_code in NAME_MISMATCH:
        return Check(
            name, FAIL, f"certificate problem: it does not name {host} ({reason})",
            f"start the hub with --tls-name {host} (it then issues itself a certificate for "
            "that name too; pins stay valid), or use a name its certificate has",
        )  # fmt: skip
    if e.verify_code == EXPIRED:
        return Check(
            name, FAIL, f"certificate problem: it has expired ({reason})",
            "restart the hub (it renews its own certificate at start); renew a certificate "
            "given with --tls-cert (certbot renew) and restart the hub",
        )  # fmt: skip
    return Check(name, FAIL, f"certificate problem: not trusted by {trust.source} ({reason})", hint)
