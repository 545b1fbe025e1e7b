"""The hub's services as the API handlers reach them: one object on the app under a typed key.

A leaf of the API room, so that routes and pages get at the services without importing the app
factory (hub/app.py), which imports them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from hub.agents.registry import Agents
from hub.cluster.leader import Leadership
from hub.config import HubConfig
from hub.ledger.ledger import Ledger
from hub.ledger.money import MICRO
from hub.market.jobs import Jobs, wallet_of
from hub.market.scheduler import Scheduler
from hub.mqtt import logins
from hub.mqtt.broker import ChildBroker
from hub.store.db import Database
from hub.store.rows import Store


def without_login(url: str) -> str:
    parts = urlsplit(url.strip())
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class Services:
    config: HubConfig
    db: Database
    store: Store
    ledger: Ledger
    jobs: Jobs
    scheduler: Scheduler
    agents: Agents
    bridge: Any = None  # hub.mqtt.bridge.Bridge once connected
    writer: Any = None  # hub.ledger.writer.Writer: group commit for API-initiated movements
    broker: ChildBroker | None = None
    mqtt_url: str = ""
    admin_token: str | None = None
    hub_login: logins.Account | None = None  # the hub's own, on its own broker
    # A job or node changed state: the app factory points this at the dashboard's live feed
    # (hub/web/live.py), so neither the API nor the bridge imports the pages.
    on_change: Callable[[str, dict[str, Any]], None] = lambda _kind, _data: None
    # Which replica runs the scheduler and the ticks (hub/cluster/leader.py); a hub alone leads.
    leadership: Leadership = field(default_factory=Leadership)

    # A broker cluster's login files (--mqtt-auth-dir), when the hub writes them.
    cluster_auth: logins.AuthFiles | None = None

    def sync_broker(self) -> bool:
        """Give the hub's own broker, or the broker cluster's login files (--mqtt-auth-dir),
        the logins and ACLs the store says (the hub, every node not revoked, every user); a
        no-op for an outside broker the operator keeps. True when they changed."""
        broker = self.broker
        own = broker is not None and broker.auth
        if self.hub_login is None or (self.cluster_auth is None and not own):
            return False
        accounts = logins.accounts(self.hub_login, *self.store.broker_logins())
        if self.cluster_auth is not None:
            return self.cluster_auth.write(accounts)
        assert broker is not None
        return broker.write_auth(accounts)

    def broker_urls_shown(self) -> list[str]:
        """The broker URL(s) the hub uses, without the login in them: for status and logs."""
        return [without_login(u) for u in self.mqtt_url.split(",") if u.strip()]

    async def broker_accepts(self, username: str, password: str) -> bool:
        """Sync the broker's logins and wait until it accepts this one (it reloads them in
        the background): whoever is handed these credentials can connect at once."""
        broker = self.broker
        if self.cluster_auth is not None:
            # A broker cluster's files: written now; its servers reload them on their own
            # (deploy/broker), so the node may be refused for a moment and retries.
            self.sync_broker()
            return True
        if broker is None or not broker.auth:
            return True
        self.sync_broker()
        return await asyncio.to_thread(broker.wait_accepts, username, password)

    def create_user(
        self, name: str, role: str, referred_by: str | None = None
    ) -> tuple[str, str, int]:
        """A user and their wallet, with the welcome grant. Returns (id, token, grant µc)."""
        user_id, token = self.store.create_user(name, role, referred_by)
        grant = self.config.welcome_grant_credits * MICRO
        with self.db.transaction():
            self.ledger.open_account(wallet_of(user_id), "wallet", user_id)
            if grant > 0:
                self.ledger.grant("welcome:" + user_id, wallet_of(user_id), grant, "welcome grant")
        self.sync_broker()  # the user id and API token are an agent's broker login
        return user_id, token, grant


SERVICES = web.AppKey("services", Services)
