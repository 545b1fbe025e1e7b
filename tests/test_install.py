"""The base install is the node and the CLI: neither imports anything of the server's stack.

`pip install deparrow` gives a laptop `edge-run` and `deparrow` with four dependencies (click,
paho-mqtt, psutil, pywasm3); the hub comes with `deparrow[hub]`, wasmtime and the Docker SDK
with `deparrow[full]` (pyproject.toml). This runs what a node and a user load, in a fresh
interpreter, and lists what of the server's stack got imported: nothing may.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER_STACK = ("hub", "aiohttp", "aiohttp_jinja2", "amqtt", "jsonschema", "msgspec", "jwt")
FULL_ONLY = ("wasmtime", "docker", "requests")

# What `edge-run` (a node: its loop, the wasm3 executor, its page, idle detection) and
# `deparrow` (every command's module, the REST client, the agent SDK) load.
PROGRAM = """
import json, sys
import deparrow.agent, deparrow.client, deparrow.cli
import edge.cli, edge.dashboard, edge.idle, edge.mqtt_paho, edge.node_loop
import edge.executors.router, edge.executors.wasm3
from click.testing import CliRunner
for main in (deparrow.cli.main, edge.cli.main):
    for cmd in [[], *([name] for name in main.commands)]:
        assert CliRunner().invoke(main, [*cmd, "--help"]).exit_code == 0, cmd
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def loaded() -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout))


def test_the_node_and_the_cli_load_nothing_of_the_servers_stack() -> None:
    top = loaded()
    assert "edge" in top and "deparrow" in top and "click" in top  # it did load them
    assert not top & set(SERVER_STACK), sorted(top & set(SERVER_STACK))
    assert not top & set(FULL_ONLY), sorted(top & set(FULL_ONLY))


def test_the_base_install_is_the_node_and_the_cli() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]}
    assert base == {"click", "paho-mqtt", "psutil", "pywasm3"}
    extras = project["optional-dependencies"]
    assert {"aiohttp", "amqtt", "msgspec", "pyjwt"} <= {d.split(">")[0] for d in extras["hub"]}
    assert {"wasmtime", "docker"} <= {d.split(">")[0] for d in extras["full"]}


def test_every_package_of_the_tree_is_in_the_install() -> None:
    """A package missing from [tool.setuptools] packages is missing from the wheel, though an
    editable install (which maps whole folders) would not show it."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    tree = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("hub", "edge", "deparrow")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert tree <= listed, sorted(tree - listed)
