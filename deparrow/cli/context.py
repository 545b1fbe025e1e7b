"""What every `deparrow` command shares: the hub and token it talks to, and the one way an
error reaches the user (a line on stderr and a non-zero exit)."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from deparrow.client import Client, HubError

DEFAULT_HUB = "http://127.0.0.1:8765"
# The local hub at its default address, with or without --tls: its admin token and the CA it
# made are read from its data directory.
LOCAL_HUBS = (
    DEFAULT_HUB,
    "https://127.0.0.1:8765",
    "http://localhost:8765",
    "https://localhost:8765",
)


def local_data_dir() -> Path:
    """Where a hub started with no --data-dir keeps its files (hub.config.default_data_dir).

    Spelled again here so the client never imports the server; the two must agree, and
    tests/test_cli.py checks that they do."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(os.environ.get("DEPARROW_DATA", str(Path(base) / "deparrow")))


def _default_token(data_dir: Path | None = None) -> str | None:
    """The local hub's admin token: used only when talking to the local hub at its default
    address, so a token for one hub is never silently sent to another; or the one in the
    data directory the user named (--data-dir)."""
    path = (data_dir or local_data_dir()) / "admin-token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _local_ca(data_dir: Path | None = None) -> str | None:
    """The CA the local hub made (deparrow hub --tls), when there is one."""
    path = (data_dir or local_data_dir()) / "tls" / "ca.pem"
    return str(path) if path.exists() else None


def die(message: str, code: int = 1) -> NoReturn:
    click.echo(f"deparrow: {message}", err=True)
    sys.exit(code)


def emit(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


class Ctx:
    def __init__(
        self,
        hub: str,
        token: str | None,
        ca: str | None = None,
        data_dir: Path | None = None,
        bootstrap: str | None = None,
        region: str | None = None,
    ) -> None:
        self.hub = hub
        self.token = token
        # --bootstrap, else DEPARROW_BOOTSTRAP: the hub's replicas are listed there, and the
        # client fails over between them (deparrow/bootstrap.py); --hub is then not used.
        self.bootstrap = bootstrap or None
        self.region = region or None  # with bootstrap: prefer this region's replicas
        # --data-dir: a hub on this machine started with --data-dir, whatever its address
        self.data_dir = data_dir
        # --ca, else DEPARROW_CA: a PEM file or a sha256: fingerprint (deparrow/client.py)
        self.ca = ca or os.environ.get("DEPARROW_CA") or None

    def is_local(self) -> bool:
        # Replicas found through a bootstrap URL are never taken for the local hub: its admin
        # token must not be sent to them.
        return self.bootstrap is None and self.hub.rstrip("/").lower() in LOCAL_HUBS

    def api_token(self) -> str | None:
        """--token, else the admin token in --data-dir, else the local hub's when --hub is
        the local default."""
        if self.token is None and self.data_dir is not None:
            token = _default_token(self.data_dir)
            if token is None:
                die(
                    f"no admin token in {self.data_dir} ({self.data_dir / 'admin-token'} is "
                    "missing or empty): give the --data-dir the hub was started with, once it "
                    "has started, or pass --token",
                    2,
                )
            return token
        if self.token is None and self.is_local():
            return _default_token()
        return self.token

    def hub_ca(self) -> str | None:
        """--ca, or the CA the local hub made when --hub is the local default over https."""
        if self.ca is None and self.hub.lower().startswith("https:"):
            if self.data_dir is not None:
                return _local_ca(self.data_dir)
            if self.is_local():
                return _local_ca()
        return self.ca

    def client(self) -> Client:
        if self.bootstrap:
            return Client(token=self.api_token(), ca=self.ca, bootstrap=self.bootstrap,
                          region=self.region)  # fmt: skip
        return Client(self.hub, self.api_token(), ca=self.hub_ca())


def run_cli(fn: Any) -> Any:
    """Turn HubError into one line on stderr."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HubError as e:
            extra = ""
            if e.body.get("field") and not str(e).startswith(str(e.body["field"])):
                extra = f" (field: {e.body['field']})"
            die(f"{e}{extra}", 1)

    return wrapper
