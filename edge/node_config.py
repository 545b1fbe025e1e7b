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


def enroll(hub: str, token: str, name: str, config_path: Path) -> dict[str, Any]:
    from edge.enroll import EnrollError
    from edge.enroll import enroll as request_enrollment
    from edge.resources import machine

    body = {"token": token, "name": name, "engines": ["wasm"], **machine()}
    try:
        config = request_enrollment(hub, body)
    except EnrollError as e:
        raise click.ClickException(str(e)) from None
    config_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = config_path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, config_path)  # a crash mid-write never leaves half a config
    return config


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
