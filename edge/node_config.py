"""The node's files: where it keeps its identity (node.json, written at enrollment) and the
owner's preferences file (--config). Used by edge-run (edge/cli.py) and its `service install`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(os.environ.get("DEPARROW_EDGE_DATA", str(Path(base) / "deparrow-edge")))


def enroll(
    hub: str, token: str, name: str, config_path: Path, ca: str | None = None
) -> dict[str, Any]:
    """Enroll with the hub and write node.json. ca (an https:// hub): "sha256:..." to fetch
    the hub's CA and keep it only if it has that fingerprint, or a PEM file of the CA to
    trust; either way it is kept as ca.pem beside node.json, which names it. Without ca an
    https:// hub is verified against the system's CAs."""
    from edge.enroll import EnrollError, fetch_ca, is_pin
    from edge.enroll import enroll as request_enrollment
    from edge.resources import machine

    body = {"token": token, "name": name, "engines": ["wasm"], **machine()}
    config_path.parent.mkdir(parents=True, exist_ok=True)
    ca_path = None
    try:
        if ca is not None:
            ca_path = str((config_path.parent / "ca.pem").resolve())
            if is_pin(ca):
                fetch_ca(hub, ca, ca_path)
            else:
                _copy_ca(ca, ca_path)
        config = request_enrollment(hub, body, ca=ca_path)
    except EnrollError as e:
        raise click.ClickException(str(e)) from None
    tmp = config_path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, config_path)  # a crash mid-write never leaves half a config
    return config


def _copy_ca(source: str, dest: str) -> None:
    """--ca FILE: the node keeps its own copy, so node.json never names a file in Downloads."""
    from edge.enroll import read_ca_pem

    pem = read_ca_pem(source)
    if os.path.abspath(source) != dest:
        with open(dest + ".tmp", "w") as f:
            f.write(pem)
        os.replace(dest + ".tmp", dest)


def load_config(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except ValueError as e:
        raise click.ClickException(
            f"{path} is not valid JSON ({e}); remove it to re-enroll"
        ) from None
    for key in ("node_id", "node_secret", "mqtt"):
        if key not in data:
            raise click.ClickException(f"{path} lacks {key!r}; remove it to re-enroll")
    return data


def load_preferences(path: Path) -> dict[str, Any]:
    """The owner's preferences file (--config): one JSON object."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise click.ClickException(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise click.ClickException(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise click.ClickException(
            f'{path} must hold a JSON object of preferences, like {{"idle": {{"hours": '
            f'"22:00-07:00"}}}}'
        )
    from edge.preferences import check_preferences

    try:
        check_preferences(data)
    except ValueError as e:
        raise click.ClickException(f"{path}: {e}") from None
    return data
