"""`deparrow --data-dir DIR` talks to a hub started with `deparrow hub --data-dir DIR` with
its admin token, as a bare `deparrow` does with the default one (issue 19: a bare
`deparrow node token` said only "no API token")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import start_hub


def deparrow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deparrow.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_data_dir_finds_the_admin_token_and_the_error_says_to_pass_it(
    tmp_path: Path, mosquitto: str
) -> None:
    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    try:
        bare = deparrow("--hub", hub.url, "node", "token")
        assert bare.returncode == 1
        assert "no API token: pass --token TOKEN" in bare.stderr
        assert "`deparrow --data-dir DIR …`" in bare.stderr, bare.stderr

        out = deparrow("--hub", hub.url, "--data-dir", str(hub.data_dir), "node", "token")
        assert out.returncode == 0, out.stderr
        assert f"edge-run --hub {hub.url} --token " in out.stdout

        wrong = deparrow("--hub", hub.url, "--data-dir", str(tmp_path / "nope"), "node", "token")
        assert wrong.returncode == 2
        assert f"no admin token in {tmp_path / 'nope'}" in wrong.stderr
    finally:
        hub.stop()
