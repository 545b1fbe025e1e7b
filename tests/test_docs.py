"""Docs that run: every CLI command is documented, and the README's two commands are there."""

from __future__ import annotations

import re
from pathlib import Path

import click

from deparrow.cli import main as hub_main
from edge.cli import main as edge_main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def commands(group: click.Group, prefix: str) -> list[str]:
    out = []
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += commands(cmd, f"{prefix} {name}")
        else:
            out.append(f"{prefix} {name}")
    return out


def test_every_cli_command_is_in_the_readme() -> None:
    missing = [
        c
        for c in commands(hub_main, "deparrow") + commands(edge_main, "edge-run")
        if c not in README
    ]
    assert not missing, f"undocumented commands: {missing}"


def test_every_command_has_help() -> None:
    for group in (hub_main, edge_main):
        for cmd in group.commands.values():
            assert cmd.help or cmd.short_help, cmd.name


def test_readme_has_exactly_two_setup_commands() -> None:
    section = README.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert [b.strip() for b in blocks] == [
        "python3 -m venv .venv && .venv/bin/pip install '.[hub]' && .venv/bin/deparrow demo",
        "make test",
    ]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
