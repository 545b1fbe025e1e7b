"""A hub listening on 0.0.0.0 never gives out 0.0.0.0 (issue 19): its start-up lines, the
edge-run command of `deparrow node token`, `status`, `network diagnose`, the enrollment's
broker URL and `edge-run diagnose` name this machine's outward address (the one of its
default route), or --public-url when the operator gives one."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from deparrow import localnet
from deparrow.localnet import Proc, wait_for
from hub.config import outward_address
from tests.conftest import start_hub
from tests.test_cli import cli

ANY = ("--host", "0.0.0.0", "--insecure-no-tls")


def test_a_hub_on_0_0_0_0_gives_out_its_outward_address(tmp_path: Path) -> None:
    outward = outward_address()
    hub = start_hub(tmp_path, extra=ANY)
    try:
        admin = hub.admin.token or ""
        # (the --insecure-no-tls warning rightly says it listens on 0.0.0.0)
        started = hub.proc.output()[hub.proc.output().index("DEparrow hub on") :]
        assert "0.0.0.0" not in started, started
        assert f"DEparrow hub on http://{outward}:{hub.port}" in started
        assert "--public-url URL" in started  # how to say otherwise

        wildcard = f"http://0.0.0.0:{hub.port}"  # as the operator typed it
        token = cli(wildcard, admin, "node", "token")
        assert token.returncode == 0, token.stderr
        assert "0.0.0.0" not in token.stdout, token.stdout
        command = next(line for line in token.stdout.splitlines() if "edge-run --hub" in line)
        assert f"edge-run --hub http://{outward}:{hub.port} --token " in command

        for args in (("status",), ("network", "diagnose", "--timeout", "3")):
            out = cli(wildcard, admin, *args)
            # the hub's own line says the URL typed; the broker's is what the hub hands out
            broker = [line for line in out.stdout.splitlines() if "mqtt" in line.lower()]
            assert broker and not any("0.0.0.0" in line for line in broker), (args, out.stdout)
            assert f"mqtt://{outward}:" in out.stdout, (args, out.stdout)

        # A node enrolled with that command is told the broker at the outward address too.
        argv = shlex.split(command[command.index("edge-run") :])[1:]
        data = tmp_path / "node"
        node = Proc(
            "node",
            [sys.executable, "-m", "edge.cli", *argv, "--name", "n", "--data-dir", str(data),
             "--always-run", "--dashboard-port", "0"],
            tmp_path / "node.log",
        )  # fmt: skip
        try:
            wait_for(
                "the node online",
                lambda: [n["state"] for n in hub.admin.nodes()] == ["idle"],
                30,
                [node, hub.proc],
            )
            assert f"online at mqtt://{outward}:" in node.output()
            diag = subprocess.run(
                [sys.executable, "-m", "edge.cli", "diagnose", "--data-dir", str(data),
                 "--timeout", "3"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert "0.0.0.0" not in diag.stdout + diag.stderr, diag.stdout
            assert outward in diag.stdout, diag.stdout
        finally:
            node.stop()
    finally:
        hub.stop()


def test_public_url_is_what_nodes_are_told(tmp_path: Path) -> None:
    hub = start_hub(tmp_path, extra=(*ANY, "--public-url", "http://hub.example.org:9999/"))
    try:
        started = hub.proc.output()
        assert "DEparrow hub on http://hub.example.org:9999" in started, started
        assert "--public-url URL" not in started
        token = cli(hub.url, hub.admin.token or "", "node", "token")
        assert "edge-run --hub http://hub.example.org:9999 --token " in token.stdout
        status = hub.admin.status()["broker"]
        assert status["public_url"].startswith("mqtt://hub.example.org:"), status
    finally:
        hub.stop()


def test_a_tls_hub_on_0_0_0_0_gives_out_the_name_its_certificate_covers(tmp_path: Path) -> None:
    """The hub's own certificate names this machine's host name, not its addresses: a node
    told the outward address would refuse the certificate."""
    import socket

    hub = localnet.LocalHub(
        tmp_path / "hub", heartbeat_s=0.5, extra=("--host", "0.0.0.0"), tls=True,
        log_path=tmp_path / "hub.log",
    )  # fmt: skip
    try:
        started = hub.proc.output()
        assert f"DEparrow hub on https://{socket.gethostname()}:{hub.port}" in started, started
        assert "is this machine's name; if they know the hub by another name" in started
    finally:
        hub.stop()
