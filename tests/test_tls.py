"""TLS everywhere a byte crosses a network (docs/tls.md), with real TLS: real hub processes
serving HTTPS and MQTT over TLS, `openssl s_client` and `mosquitto_pub --cafile` checking the
chain, a real edge-run node that pins the hub's CA by its fingerprint and runs a job over
TLS, and the deparrow CLI over HTTPS."""

from __future__ import annotations

import html
import json
import os
import re
import ssl
import stat
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import psutil
import pytest
import trustme

from deparrow.client import Client
from deparrow.localnet import LocalHub, Proc, free_port, wait_for
from edge.enroll import pem_fingerprint, tls_context
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


# --- the tools around a TLS hub: one hub with its own CA and broker, and a node pinning it ----
@pytest.fixture(scope="module")
def tls_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalHub, str]]:
    """A hub with its own CA and its own Mosquitto over TLS, and an owner's API token."""
    require_mosquitto()
    tmp = tmp_path_factory.mktemp("tls-tools")
    hub = LocalHub(tmp / "hub", broker="mosquitto", tls=True, log_path=tmp / "hub.log")
    try:
        yield hub, hub.user("owner")[0]["token"]
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def tls_node(
    tls_hub: tuple[LocalHub, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A running edge-run node that pinned the hub's CA (enrolled with --ca sha256:...): its
    data directory."""
    hub, owner = tls_hub
    data = tmp_path_factory.mktemp("tls-node")
    node = hub.start_node(Client(hub.url, owner, ca=hub.ca), data, "pinned", verbose=False)
    try:
        yield data
    finally:
        node.stop()


def pin_of(hub: LocalHub) -> str:
    return pem_fingerprint(Path(hub.ca or "").read_text())


def check_lines(out: str) -> dict[str, str]:
    """A diagnosis's lines by check name (what comes before the address or the colon)."""
    found = {}
    for line in out.splitlines():
        name = line[6:].split(": ")[0]
        for key in ("hub TLS", "broker TLS", "hub HTTP", "MQTT login", "MQTT round trip"):
            if name.startswith(key):
                found[key] = line
    return found


def other_ca(path: Path) -> Path:
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def test_the_dashboard_shows_the_enrollment_command_the_api_gives(
    tls_hub: tuple[LocalHub, str], tmp_path: Path
) -> None:
    hub, owner = tls_hub
    https = urllib.request.HTTPSHandler(context=tls_context(ca_file=hub.ca))
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(), https)
    browser.open(hub.url + "/signin", data=urlencode({"token": owner}).encode(), timeout=30)
    page = browser.open(hub.url + "/nodes/token", data=b"", timeout=30).read().decode()
    shown = re.search(r'<pre class="code" id="enroll-command">(.*?)</pre>', page)
    assert shown is not None, page
    command = html.unescape(shown.group(1)).split()
    api = Client(hub.url, owner, ca=hub.ca).enrollment_token()["command"].split()
    # the same command but for its one-time token, --ca pin included
    assert command[:4] == api[:4] == ["edge-run", "--hub", hub.url, "--token"]
    assert command[5:] == api[5:] == ["--ca", pin_of(hub)]
    assert command[4].startswith("dpe_") and command[4] != api[4]
    assert 'id="enroll-ca"' in page and "pins it by its fingerprint" in page

    # It enrolls a node as printed: the node pins the CA and comes online over mqtts://.
    node = Proc(
        "dashboard-node",
        [sys.executable, "-m", "edge.cli", *command[1:], "--name", "from-the-page",
         "--data-dir", str(tmp_path / "node"), "--always-run", "--dashboard-port", "0"],
        tmp_path / "node.log",
    )  # fmt: skip
    try:
        admin = hub.admin
        wait_for("the node from the page", lambda: any(
            n["name"] == "from-the-page" and n["state"] == "idle" for n in admin.nodes()
        ), 60, [node, hub.proc])  # fmt: skip
        config = json.loads((tmp_path / "node" / "node.json").read_text())
        assert config["mqtt"]["url"].startswith("mqtts://")
        assert pem_fingerprint(Path(config["ca"]).read_text()) == pin_of(hub)
    finally:
        node.stop()


def test_edge_run_diagnose_checks_the_certificates_with_the_nodes_pinned_ca(
    tls_hub: tuple[LocalHub, str], tls_node: Path, tmp_path: Path
) -> None:
    out = subprocess.run([sys.executable, "-m", "edge.cli", "diagnose", "--data-dir",
                          str(tls_node)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    found = check_lines(out.stdout)
    ca = str((tls_node / "ca.pem").resolve())
    for key in ("hub TLS", "broker TLS"):
        assert found[key].startswith("ok    "), out.stdout
        assert f"verified against the CA in {ca}" in found[key]
    # the node runs: its login holds its one connection, so the login is not tried beside it
    assert found["MQTT round trip"].startswith("skip  ") and "connected now" in found["MQTT login"]

    # The same identity trusting another CA (a hub that made a new one): the certificate lines
    # fail and say so, and what to do; nothing reads as "the hub is down".
    config = json.loads((tls_node / "node.json").read_text())
    config["ca"] = str(other_ca(tmp_path / "other-ca.pem"))
    (tmp_path / "node.json").write_text(json.dumps(config))
    bad = subprocess.run([sys.executable, "-m", "edge.cli", "diagnose", "--data-dir",
                          str(tmp_path), "--json"], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert bad.returncode == 1
    checks = {" ".join(c["name"].split()[:2]): c for c in json.loads(bad.stdout)["checks"]}
    for key in ("hub TLS", "broker TLS"):
        assert checks[key]["status"] == "FAIL", checks
        assert checks[key]["detail"].startswith("certificate problem: not trusted by the CA in")
        assert "re-enroll" in checks[key]["hint"] and "--ca sha256:" in checks[key]["hint"]
    assert checks["hub HTTP"]["status"] == "skip"
    assert checks["hub HTTP"]["detail"] == "the hub's certificate is not trusted"
    assert checks["MQTT login"]["status"] == "skip"


def test_deparrow_network_diagnose_pins_the_ca_and_names_a_certificate_problem(
    tls_hub: tuple[LocalHub, str], tmp_path: Path
) -> None:
    hub, owner = tls_hub
    base = ["--hub", hub.url, "--token", owner]
    for how in (["--ca", pin_of(hub)], ["--ca", hub.ca or ""]):
        out = deparrow(*base, *how, "network", "diagnose")
        assert out.returncode == 0, (how, out.stdout + out.stderr)
        found = check_lines(out.stdout)
        assert found["hub TLS"].startswith("ok    hub TLS 127.0.0.1:"), out.stdout
        assert found["broker TLS"].startswith("ok    broker TLS 127.0.0.1:"), out.stdout
        assert found["MQTT round trip"].startswith("ok    "), out.stdout

    no_ca = deparrow(*base, "network", "diagnose", env={"DEPARROW_CA": ""})
    assert no_ca.returncode == 1
    line = check_lines(no_ca.stdout)["hub TLS"]
    assert line.startswith("FAIL  hub TLS 127.0.0.1:")
    assert "certificate problem: not trusted by the system's CAs" in line
    assert "pass --ca with the hub's CA file or the sha256: fingerprint" in line

    wrong = "sha256:" + "ab" * 32
    other = deparrow(*base, "--ca", wrong, "status", "--deep")
    assert other.returncode == 1
    line = check_lines(other.stdout)["hub TLS"]
    assert f"presents a CA with fingerprint {pin_of(hub)}, not {wrong}" in line

    # A plain port named as MQTT over TLS: its own line says there is no TLS there.
    plain = urlsplit(hub.admin.status()["broker"]["url"])
    out = deparrow(*base, "--ca", hub.ca or "", "network", "diagnose",
                   "--mqtt", f"mqtts://127.0.0.1:{plain.port}")  # fmt: skip
    assert out.returncode == 1
    line = check_lines(out.stdout)["broker TLS"]
    assert line.startswith(f"FAIL  broker TLS 127.0.0.1:{plain.port}: no TLS handshake")
    assert "a TLS port?" in line


def test_an_agent_submits_over_mqtt_tls_and_receives_its_final_reply(
    tls_hub: tuple[LocalHub, str], tls_node: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deparrow import Agent, DeparrowError

    hub, owner = tls_hub
    monkeypatch.delenv("DEPARROW_CA", raising=False)
    with pytest.raises(DeparrowError, match="certificate is not trusted"):
        Agent(hub.url, owner).wallet()  # no CA: the system's do not know the hub's
    agent = Agent.create(hub.url, owner, "tls-agent", fund="1", ca=pin_of(hub))
    assert agent.ca == pin_of(hub)
    finals: list[dict[str, Any]] = []
    done = threading.Event()

    def on_done(job: dict[str, Any]) -> None:
        finals.append(job)
        done.set()

    try:
        job_id = agent.submit_job(FIB, via="mqtt", on_done=on_done)
        assert done.wait(60), agent.job(job_id)
        (final,) = finals
        assert final["id"] == job_id and final["state"] == "completed"
        assert final["result"]["returns"] == [6765]
        # the connection it came on is the broker's TLS listener
        assert urlsplit(hub.admin.status()["broker"]["public_url"]).scheme == "mqtts"
    finally:
        agent.close()


def test_board_provision_pins_the_ca_and_writes_it_on_the_image(
    tls_hub: tuple[LocalHub, str], tmp_path: Path
) -> None:
    from deparrow import board
    from tests.images.test_board import make_disk, mtype

    hub, owner = tls_hub
    client = Client(hub.url, owner, ca=hub.ca)
    img = tmp_path / "sdcard.img"
    offset = make_disk(img, board_json={"board": "picoclaw", "arch": "riscv64", "cpu": 1,
                                        "memory_mb": 256})  # fmt: skip
    token = client.enrollment_token()["token"]
    wrong = deparrow("board", "provision", str(img), "--hub", hub.url, "--token", token,
                     "--ca", "sha256:" + "ab" * 32)  # fmt: skip
    assert wrong.returncode == 1 and "refusing to trust it" in wrong.stderr
    assert board.read_file(img, "deparrow/node.json") is None  # and the token is not spent

    out = deparrow("board", "provision", str(img), "--hub", hub.url, "--token", token,
                   "--ca", pin_of(hub), "--name", "board-1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "deparrow/node.json, deparrow/ca.pem" in out.stdout
    assert f"the board trusts only the hub's CA {pin_of(hub)}" in out.stdout
    on_image = mtype(img, offset, "deparrow/ca.pem").stdout
    assert on_image.encode() == Path(hub.ca or "").read_bytes()
    identity = json.loads(mtype(img, offset, "deparrow/node.json").stdout)
    assert identity["ca"] == board.BOARD_CA_PATH == "/boot/deparrow/ca.pem"
    assert identity["mqtt"]["url"].startswith("mqtts://")

    # A node started from that identity, finding the CA where the booted board would (here
    # under a stand-in for /boot), comes online over TLS.
    boot = tmp_path / "boot" / "deparrow"
    boot.mkdir(parents=True)
    (boot / "ca.pem").write_text(on_image)
    identity["ca"] = str(boot / "ca.pem")
    data = tmp_path / "board-data"
    data.mkdir()
    (data / "node.json").write_text(json.dumps(identity))
    node = Proc("board-node", [sys.executable, "-m", "edge.cli", "--data-dir", str(data),
                               "--always-run", "--dashboard-port", "0"],
                tmp_path / "board-node.log")  # fmt: skip
    try:
        wait_for("the provisioned board online", lambda: any(
            n["name"] == "board-1" and n["state"] == "idle" for n in client.nodes()
        ), 60, [node])  # fmt: skip
    finally:
        node.stop()

    # --json says which CA; DEPARROW_CA stands for --ca, as everywhere in deparrow.
    again = deparrow("board", "provision", str(img), "--hub", hub.url, "--token",
                     client.enrollment_token()["token"], "--json",
                     env={"DEPARROW_CA": str(hub.ca)})  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["ca"] == pin_of(hub)
