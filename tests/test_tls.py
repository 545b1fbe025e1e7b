"""TLS everywhere a byte crosses a network (docs/tls.md), with real TLS: real hub processes
serving HTTPS and MQTT over TLS, `openssl s_client` and `mosquitto_pub --cafile` checking the
chain, a real edge-run node that pins the hub's CA by its fingerprint and runs a job over
TLS, and the deparrow CLI over HTTPS."""

from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
import trustme

from deparrow.localnet import LocalHub, Proc, free_port, wait_for
from edge.enroll import pem_fingerprint
from hub.tls import TlsError, ensure_tls, server_names
from tests.conftest import require_mosquitto

FIB = {"engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]},
       "timeout": 30}  # fmt: skip


def deparrow(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deparrow.cli", *args], capture_output=True, text=True,
        timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


def s_client(port: int, ca: Path) -> subprocess.CompletedProcess[str]:
    """openssl s_client, as an operator checks a server: the chain must lead to ca and the
    certificate must name 127.0.0.1."""
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca),
         "-verify_return_error", "-verify_ip", "127.0.0.1", "-showcerts"],
        input="", capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def served_pem(url: str) -> bytes:
    """GET /api/v1/tls/ca the way a node does before it trusts anything: unverified."""
    blind = ssl.create_default_context()
    blind.check_hostname = False
    blind.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(url + "/api/v1/tls/ca", context=blind, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("application/x-pem-file")
        return bytes(resp.read())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the files -------------------------------------------------------------------------
def test_the_hub_makes_its_ca_once_and_reissues_only_the_server_certificate(
    tmp_path: Path,
) -> None:
    names = server_names("10.1.2.3", ["hub.example.org"])
    assert {"localhost", "127.0.0.1", "::1", "10.1.2.3", "hub.example.org"} <= set(names)
    assert "0.0.0.0" not in server_names("0.0.0.0")
    first = ensure_tls(tmp_path, names=names)
    tls = tmp_path / "tls"
    assert first.ca_pem == tls / "ca.pem" and first.cert == tls / "server.pem"
    assert mode(tls / "ca.key") == 0o600 and mode(tls / "server.key") == 0o600
    assert first.fingerprint == pem_fingerprint((tls / "ca.pem").read_text())
    out = subprocess.run(["openssl", "verify", "-CAfile", str(tls / "ca.pem"),
                          str(tls / "server.pem")], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    sans = subprocess.run(["openssl", "x509", "-in", str(tls / "server.pem"), "-noout", "-ext",
                           "subjectAltName"], capture_output=True, text=True).stdout  # fmt: skip
    assert "DNS:hub.example.org" in sans and "IP Address:10.1.2.3" in sans, sans

    kept = {p.name: p.read_bytes() for p in tls.iterdir()}
    again = ensure_tls(tmp_path, names=names)
    assert again == first and {p.name: p.read_bytes() for p in tls.iterdir()} == kept

    more = ensure_tls(tmp_path, names=[*names, "other.example.org"])
    assert more.fingerprint == first.fingerprint  # the CA every node pinned stays
    assert (tls / "ca.pem").read_bytes() == kept["ca.pem"]
    assert (tls / "server.pem").read_bytes() != kept["server.pem"]


def test_an_operators_key_that_does_not_fit_its_certificate_is_refused(tmp_path: Path) -> None:
    ca = trustme.CA()
    one, two = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    one.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    two.private_key_pem.write_to_path(str(tmp_path / "other.key"))
    with pytest.raises(TlsError, match="does not belong to the certificate"):
        ensure_tls(tmp_path, tmp_path / "cert.pem", tmp_path / "other.key")
    with pytest.raises(TlsError, match="both --tls-cert and --tls-key"):
        ensure_tls(tmp_path, tmp_path / "cert.pem")
    assert not (tmp_path / "tls").exists()


def test_the_cli_finds_the_local_hubs_ca_as_it_finds_its_admin_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deparrow.cli.context import Ctx

    monkeypatch.setenv("DEPARROW_DATA", str(tmp_path))
    monkeypatch.delenv("DEPARROW_CA", raising=False)
    ensure_tls(tmp_path)
    local = str(tmp_path / "tls" / "ca.pem")
    assert Ctx("https://127.0.0.1:8765", None).hub_ca() == local
    assert Ctx("https://localhost:8765/", None).hub_ca() == local
    assert Ctx("https://hub.example.org:8765", None).hub_ca() is None  # never another hub's
    assert Ctx("http://127.0.0.1:8765", None).hub_ca() is None
    assert Ctx("https://127.0.0.1:8765", None, "mine.pem").hub_ca() == "mine.pem"
    monkeypatch.setenv("DEPARROW_CA", "sha256:" + "1" * 64)
    assert Ctx("https://hub.example.org:8765", None).hub_ca() == "sha256:" + "1" * 64


# --- a hub with its own CA -------------------------------------------------------------
def test_https_with_the_hubs_own_ca_the_pin_it_hands_out_and_the_cli(
    tmp_path: Path, mosquitto: str
) -> None:
    hub = LocalHub(tmp_path / "hub", mqtt_url=mosquitto, tls=True)
    ca = tmp_path / "hub" / "tls" / "ca.pem"
    admin = hub.admin.token or ""
    try:
        assert hub.url.startswith("https://")
        seen = s_client(hub.port, ca)
        assert seen.returncode == 0, seen.stdout + seen.stderr
        assert "Verify return code: 0 (ok)" in seen.stdout
        served = served_pem(hub.url)
        assert served == ca.read_bytes()
        fingerprint = pem_fingerprint(served.decode())

        token = deparrow("--hub", hub.url, "--ca", str(ca), "--token", admin, "node", "token")
        assert token.returncode == 0, token.stderr
        words = token.stdout.split()
        assert words[:3] == ["edge-run", "--hub", hub.url]
        assert words[-2:] == ["--ca", fingerprint], token.stdout
        cli = ["--hub", hub.url, "--ca", str(ca), "--token", admin]
        as_json = json.loads(deparrow(*cli, "node", "token", "--json").stdout)
        assert as_json["ca"] == fingerprint

        # The CLI over HTTPS: the CA as a file, as a fingerprint, from the environment.
        for how, env in (
            (["--ca", str(ca)], {}),
            (["--ca", fingerprint], {}),
            ([], {"DEPARROW_CA": fingerprint}),
        ):
            out = deparrow("--hub", hub.url, *how, "--token", admin, "status", env=env)
            assert out.returncode == 0, (how, out.stdout, out.stderr)
            assert out.stdout.startswith(f"ok    hub reachable at {hub.url}")
        plain = deparrow("--hub", hub.url, "--token", admin, "status", env={"DEPARROW_CA": ""})
        assert plain.returncode == 1
        assert "certificate is not trusted" in plain.stdout
        assert "--ca" in plain.stdout, plain.stdout
        wrong = "sha256:" + "0" * 64
        other = deparrow("--hub", hub.url, "--ca", wrong, "--token", admin, "wallet")
        assert other.returncode == 1
        assert f"fingerprint {fingerprint}, not {wrong}" in other.stderr, other.stderr
    finally:
        hub.stop()

    # A restart keeps the CA (every node pinned it) and serves with it again.
    kept = ca.read_bytes()
    again = LocalHub(tmp_path / "hub", mqtt_url=mosquitto, tls=True)
    try:
        assert ca.read_bytes() == kept
        assert served_pem(again.url) == kept
        assert s_client(again.port, ca).returncode == 0
    finally:
        again.stop()


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_a_node_pins_the_ca_by_fingerprint_and_runs_a_job_over_tls(
    tmp_path: Path, broker: str
) -> None:
    if broker == "mosquitto":
        require_mosquitto()
    # Beyond loopback, as a real hub: the TLS listeners face the network, the broker's plain
    # listener (the hub's own bridge) stays on loopback.
    hub = LocalHub(
        tmp_path / "hub", broker=broker, tls=True, extra=("--host", "0.0.0.0"),
        log_path=tmp_path / "hub.log",
    )  # fmt: skip
    ca = tmp_path / "hub" / "tls" / "ca.pem"
    node: Proc | None = None
    try:
        _, owner = hub.user("owner")
        _, alice = hub.user("alice")
        grant = owner.enrollment_token()
        command = grant["command"].split()
        assert command == ["edge-run", "--hub", hub.url, "--token", grant["token"],
                           "--ca", pem_fingerprint(ca.read_text())]  # fmt: skip
        edge_run = [sys.executable, "-m", "edge.cli"]
        rest = ["--name", "n", "--always-run", "--dashboard-port", "0", "-v"]

        # A wrong fingerprint: refused with the reason, nothing enrolled, nothing kept.
        wrong = [*edge_run, *command[1:5], "--ca", "sha256:" + "ab" * 32, *rest]
        bad = subprocess.run([*wrong, "--data-dir", str(tmp_path / "bad")],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert bad.returncode != 0
        assert "not sha256:" + "ab" * 32 in bad.stderr and "fingerprint" in bad.stderr
        assert not (tmp_path / "bad" / "node.json").exists()
        assert not (tmp_path / "bad" / "ca.pem").exists()
        assert owner.nodes() == []

        # The command as printed (the same token: the refusal did not spend it).
        cmd = [*edge_run, *command[1:], *rest, "--data-dir", str(tmp_path / "node")]
        node = Proc("n", cmd, tmp_path / "node.log")
        wait_for("the node", lambda: any(n["state"] == "idle" for n in owner.nodes()), 60,
                 [node, hub.proc])  # fmt: skip
        job = alice.wait(alice.submit(FIB)["id"], timeout_s=60)
        assert job["state"] == "completed", (job, node.tail())
        assert job["result"]["returns"] == [6765]

        config = json.loads((tmp_path / "node" / "node.json").read_text())
        assert config["hub"] == hub.url
        assert config["ca"] == str((tmp_path / "node" / "ca.pem").resolve())
        assert Path(config["ca"]).read_bytes() == ca.read_bytes()
        mqtts = urlsplit(config["mqtt"]["url"])
        assert mqtts.scheme == "mqtts" and mqtts.hostname == "127.0.0.1"

        # The node's one broker connection is to the TLS listener; the plain one is loopback.
        plain = urlsplit(hub.admin.status()["broker"]["url"])
        assert plain.port != mqtts.port
        peers = {c.raddr.port for c in psutil.Process(node.p.pid).net_connections("tcp")
                 if c.raddr and c.status == psutil.CONN_ESTABLISHED}  # fmt: skip
        assert mqtts.port in peers and plain.port not in peers, peers
        listening = {c.laddr.port: c.laddr.ip for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}  # fmt: skip
        assert listening.get(plain.port) == "127.0.0.1", listening.get(plain.port)
        assert listening.get(mqtts.port) == "0.0.0.0", listening.get(mqtts.port)

        # An address the certificate does not name: refused, and the message says the fix.
        other = deparrow("--hub", f"https://127.0.0.2:{hub.port}", "--ca", str(ca),
                         "--token", hub.admin.token or "", "wallet")  # fmt: skip
        assert other.returncode == 1
        assert "does not name 127.0.0.2: start the hub with --tls-name 127.0.0.2" in other.stderr

        # What an operator checks by hand: the chain on the MQTT port, and an agent's login
        # over TLS with the CA (and not without it).
        seen = s_client(mqtts.port, ca)
        assert seen.returncode == 0 and "Verify return code: 0 (ok)" in seen.stdout, seen.stdout
        if broker == "mosquitto":
            agent = owner.request("POST", "/api/v1/agents", {"name": "a", "fund": "1"})
            pub = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mqtts.port), "-u", agent["id"],
                   "-P", agent["token"], "-i", agent["id"], "-q", "1", "-m", "hi",
                   "-t", f"dp/v1/agents/{agent['id']}/tls-check"]  # fmt: skip
            ok = subprocess.run([*pub, "--cafile", str(ca)], capture_output=True, text=True,
                                timeout=30)  # fmt: skip
            assert ok.returncode == 0, ok.stderr
            refused = subprocess.run(pub, capture_output=True, text=True, timeout=30)
            assert refused.returncode != 0
    finally:
        if node is not None:
            node.stop()
        hub.stop()


# --- the operator's certificate --------------------------------------------------------
def test_an_operators_certificate_is_served_as_given(tmp_path: Path, mosquitto: str) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = tmp_path / "fullchain.pem", tmp_path / "privkey.pem", tmp_path / "ca.pem"
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    hub = LocalHub(
        tmp_path / "hub", mqtt_url=mosquitto, tls=True,
        extra=("--tls-cert", str(cert), "--tls-key", str(key)), ca=str(ca_file),
    )  # fmt: skip
    try:
        seen = s_client(hub.port, ca_file)
        assert seen.returncode == 0 and "Verify return code: 0 (ok)" in seen.stdout
        first = leaf.cert_chain_pems[0].bytes().decode()
        assert pem_fingerprint(seen.stdout) == pem_fingerprint(first)  # their certificate
        assert not (tmp_path / "hub" / "tls").exists()  # and no CA of the hub's
        out = deparrow("--hub", hub.url, "--ca", str(ca_file), "--token",
                       hub.admin.token or "", "node", "token", "--json")  # fmt: skip
        grant = json.loads(out.stdout)
        # Issued by a CA the nodes trust already (as Let's Encrypt's are): no pin to carry,
        # which would break at the certificate's next renewal.
        assert grant["ca"] is None and "--ca" not in grant["command"]
        assert served_pem(hub.url).decode() == first
    finally:
        hub.stop()


# --- listening beyond loopback ---------------------------------------------------------
def test_listening_beyond_loopback_without_tls_is_refused_unless_asked_for(
    tmp_path: Path, mosquitto: str
) -> None:
    out = deparrow("hub", "--host", "0.0.0.0", "--port", str(free_port()),
                   "--data-dir", str(tmp_path / "refused"), "--mqtt", mosquitto)  # fmt: skip
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0 without TLS" in out.stderr
    assert "--tls" in out.stderr and "--insecure-no-tls" in out.stderr
    assert not (tmp_path / "refused").exists()  # refused before anything was made
    both = deparrow("hub", "--tls", "--insecure-no-tls", "--data-dir", str(tmp_path / "x"))
    assert both.returncode == 2 and "contradict" in both.stderr

    hub = LocalHub(tmp_path / "hub", mqtt_url=mosquitto,
                   extra=("--host", "0.0.0.0", "--insecure-no-tls"))  # fmt: skip
    try:
        assert hub.admin.status()["hub"] == "ok"
        assert "without TLS (--insecure-no-tls)" in hub.proc.output()
    finally:
        hub.stop()
