"""The node's own page: its state, the jobs it ran, the credits it earned.

`edge-run --dashboard-port 8080` serves it on 127.0.0.1 (an HTML page at /, the same data as
JSON at /api/state). The node loop never waits for it: the loop calls NodeStatus.observe()
each turn, which only compares a few counters and, when something changed (or once a second),
swaps in a new snapshot dict; the server threads read that reference. Credits come from the
hub (GET /api/v1/nodes/<id> with the node's own credentials) in a third thread.

The credits, and "earned today", are edge/earnings.py's.

CPython only (http.server, threads, urllib); a board serves its own page.
"""

from __future__ import annotations

import collections
import errno
import html
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from edge.earnings import Earnings, format_micro, rounded

log = logging.getLogger("edge.dashboard")

RECENT = 20  # finished jobs listed on the page
REBUILD_EVERY_S = 1.0  # refresh uptime and ages even when no counter moved
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class NodeStatus:
    """What the page shows, as a snapshot the node loop refreshes and the server reads."""

    def __init__(self, config: dict[str, Any], earnings: Earnings | None = None) -> None:
        self.node_id = str(config["node_id"])
        self.owner = config.get("owner")
        self.hub = config.get("hub")
        self.mqtt_url = (config.get("mqtt") or {}).get("url")
        self.earnings = earnings
        self.started_at = time.time()
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        self._finished = 0
        self._running_since: dict[str, float] = {}
        self._signature: tuple[Any, ...] | None = None
        self._built = 0.0
        self._broken = False
        self._snap = self._base("starting", f"connecting to the broker at {self.mqtt_url}")

    def _base(self, state: str, why: str) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "owner": self.owner,
            "hub": self.hub,
            "broker": {"url": self.mqtt_url, "connected": False},
            "state": state,
            "why": why,
            "running": [],
            "jobs": {"completed": 0, "failed": 0, "recent": []},
            "heartbeats": 0,
            "queued": 0,
            "started_at": self.started_at,
        }

    def snapshot(self) -> dict[str, Any]:
        snap = dict(self._snap)  # the loop replaces _snap whole, so this copy is consistent
        snap["earnings"] = self.earnings.view() if self.earnings is not None else None
        snap["now"] = time.time()
        snap["uptime_s"] = int(snap["now"] - self.started_at)
        return snap

    def observe(self, session: Any, mqtt: Any) -> None:
        """Called by the node loop every turn: cheap unless something changed. Never raises."""
        try:
            self._observe(session, mqtt)
        except Exception:  # the page must never take the node down
            if not self._broken:
                log.exception("node page: cannot read the node's state; the page may be stale")
                self._broken = True

    def _observe(self, session: Any, mqtt: Any) -> None:
        runner = session.runner
        finished = runner.completed + runner.failed
        connected = bool(mqtt.connected()) if hasattr(mqtt, "connected") else True
        state = session.state()
        reason = getattr(session, "why", None)  # the idle gate's last word, where there is one
        signature = (finished, connected, state, reason, tuple(runner.running))
        now = time.monotonic()
        if signature == self._signature and now - self._built < REBUILD_EVERY_S:
            return
        self._signature, self._built = signature, now
        wall = time.time()
        if finished > self._finished:
            new = runner.done[-min(finished - self._finished, len(runner.done)) :]
            for job_id, attempt, msg in new:
                self._recent.appendleft(
                    {
                        "job_id": job_id,
                        "attempt": attempt,
                        "state": msg.get("state"),
                        "exit_code": msg.get("exit_code"),
                        "error": msg.get("error"),
                        "wall_ms": msg.get("wall_ms"),
                        "finished_at": wall,
                    }
                )
            self._finished = finished
            if self.earnings is not None:
                self.earnings.soon()
        for job_id in list(self._running_since):
            if job_id not in runner.running:
                del self._running_since[job_id]
        running = [
            {"job_id": j, "since": self._running_since.setdefault(j, wall)} for j in runner.running
        ]
        shown, why = describe_state(state, reason, connected, running, self.mqtt_url)
        snap = self._base(shown, why)
        snap["broker"]["connected"] = connected
        snap["running"] = running
        snap["jobs"] = {
            "completed": runner.completed,
            "failed": runner.failed,
            "recent": list(self._recent),
        }
        snap["heartbeats"] = getattr(session, "seq", 0)
        outbox = getattr(session, "outbox", None)
        snap["queued"] = len(outbox) if outbox is not None else 0  # waiting for the broker
        self._snap = snap


def describe_state(
    state: str, reason: Any, connected: bool, running: list[dict[str, Any]], mqtt_url: Any
) -> tuple[str, str]:
    """(idle | busy | paused | offline, why) for people."""
    if not connected:
        return "offline", f"not connected to the broker at {mqtt_url}; reconnecting"
    if state == "suspended":
        return "paused", str(reason or "paused by this node's preferences")
    if running:
        return "busy", "running " + ", ".join(r["job_id"] for r in running)
    if state == "busy":
        return "busy", "busy"
    return str(state), "waiting for a job" + (f" ({reason})" if reason else "")


# --- the page --------------------------------------------------------------------------------
def _ms(value: Any) -> str:
    if not isinstance(value, int | float):
        return "—"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{int(value)} ms"


def _clock(t: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if isinstance(t, int | float) else "—"


def _money(name: str, micro: int) -> str:
    """An amount rounded for reading, the exact one in its title (as on the hub's pages)."""
    return f"<b id='{name}' title='{format_micro(micro)} credits'>{rounded(micro)}</b>"


def render_fragment(snap: dict[str, Any]) -> str:
    """The page's body; the page fetches it again every few seconds."""
    e = html.escape
    earn = snap.get("earnings") or {}
    rows = []
    for j in snap["jobs"]["recent"]:
        outcome = j["state"] or "?"
        if j.get("error"):
            outcome += ": " + str(j["error"])
        elif j.get("exit_code") not in (None, 0):
            outcome += f" (exit {j['exit_code']})"
        rows.append(
            f"<tr class='{e(str(j['state']))}'><td>{e(_clock(j['finished_at']))}</td>"
            f"<td><code>{e(str(j['job_id']))}</code></td><td>{e(outcome)}</td>"
            f"<td class='num'>{e(_ms(j.get('wall_ms')))}</td></tr>"
        )
    jobs = "".join(rows) or "<tr><td colspan='4'>no jobs yet</td></tr>"
    split = ""
    if earn.get("total") is not None:
        credits = (
            f"<b id='today'>{e(earn['today'])}</b> today · "
            f"<b id='total'>{e(earn['total'])}</b> in total"
        )
        if "work_micro" in earn:
            days = earn["recent_days"]
            split = (
                f"<tr><th>earned</th><td>work {_money('work', earn['work_micro'])} · uptime"
                f" {_money('uptime', earn['uptime_micro'])}</td></tr>"
                f"<tr><th>recently</th><td>{_money('recent', earn['recent_micro'])} in the last"
                f" {days} day{'s' if days > 1 else ''} ({_money('per-day', earn['per_day_micro'])}"
                f" a day)</td></tr>"
            )
    else:
        credits = "not known yet"
    if earn.get("error"):
        credits += f" <span class='warn'>({e(earn['error'])})</span>"
    broker = "connected" if snap["broker"]["connected"] else "not connected"
    if snap.get("queued") and not snap["broker"]["connected"]:
        broker += f"; {snap['queued']} messages queued for it"
    return (
        f"<p class='state {e(snap['state'])}'><b id='state'>{e(snap['state'])}</b> — "
        f"<span id='why'>{e(snap['why'])}</span></p>"
        f"<table class='facts'>"
        f"<tr><th>credits</th><td>{credits}</td></tr>{split}"
        f"<tr><th>jobs</th><td><span id='completed'>{snap['jobs']['completed']}</span> completed,"
        f" <span id='failed'>{snap['jobs']['failed']}</span> failed</td></tr>"
        f"<tr><th>broker</th><td>{e(str(snap['broker']['url']))} ({broker})</td></tr>"
        f"<tr><th>hub</th><td>{e(str(snap['hub']))}</td></tr>"
        f"<tr><th>owner</th><td><code>{e(str(snap['owner']))}</code></td></tr>"
        f"<tr><th>up</th><td>{snap['uptime_s'] // 3600} h {snap['uptime_s'] % 3600 // 60} min,"
        f" {snap['heartbeats']} heartbeats</td></tr></table>"
        f"<h2>Last jobs</h2><table class='jobs'><tr><th>finished</th><th>job</th>"
        f"<th>outcome</th><th class='num'>took</th></tr>{jobs}</table>"
        f"<p class='small'>updated {e(_clock(snap['now']))} · JSON: <a href='/api/state'>"
        f"/api/state</a></p>"
    )


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>DEparrow node {node}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 46em;
       padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.3em; }} h2 {{ font-size: 1.05em; margin-top: 1.5em; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .25em .6em .25em 0; border-bottom: 1px solid #eee; }}
.facts th {{ width: 7em; color: #666; font-weight: normal; }}
.num {{ text-align: right; }} .small {{ color: #777; font-size: .85em; }}
.state {{ font-size: 1.15em; padding: .5em .8em; border-radius: .3em; background: #eef6ee; }}
.state.busy {{ background: #eef2fb; }} .state.paused {{ background: #fbf6e6; }}
.state.offline, .state.starting {{ background: #fbeaea; }}
tr.failed td {{ color: #a33; }} .warn {{ color: #a60; }}
</style></head>
<body><h1>DEparrow node <code>{node}</code></h1>
<div id="live">{body}</div>
<script>
// Refresh the body in place; the page reads fine without this (it is rendered on the node).
setInterval(function () {{
  fetch("/fragment").then(function (r) {{ return r.ok ? r.text() : null; }})
    .then(function (t) {{ if (t) document.getElementById("live").innerHTML = t; }})
    .catch(function () {{}});
}}, 2000);
</script></body></html>
"""


def render_page(snap: dict[str, Any]) -> str:
    return PAGE.format(node=html.escape(snap["node_id"]), body=render_fragment(snap))


def _host_allowed(header: str | None) -> bool:
    """On a loopback address, answer only requests addressed to loopback: a web page elsewhere
    cannot then read this one through DNS rebinding."""
    if not header:
        return False
    host = header.strip()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.lower() in LOOPBACK


class Dashboard:
    """The page's HTTP server, in threads of its own."""

    def __init__(self, status: NodeStatus, host: str, port: int) -> None:
        """Binds at once: OSError when the address is taken (or not ours to bind)."""
        self.status = status
        loopback_only = host in LOOPBACK

        class Handler(BaseHTTPRequestHandler):
            server_version = "deparrow-node"

            def do_GET(self) -> None:
                if loopback_only and not _host_allowed(self.headers.get("Host")):
                    self._send(403, "text/plain", b"this page answers only on 127.0.0.1\n")
                    return
                path = self.path.split("?", 1)[0]
                snap = status.snapshot()
                if path == "/api/state":
                    self._send(200, "application/json", json.dumps(snap, indent=1).encode())
                elif path == "/fragment":
                    self._send(200, "text/html; charset=utf-8", render_fragment(snap).encode())
                elif path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", render_page(snap).encode())
                else:
                    body = json.dumps({"error": f"no page {path}: try / or /api/state"})
                    self._send(404, "application/json", body.encode())

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s " + format, self.address_string(), *args)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.server = Server((host, port), Handler)
        self.host = host
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.5},
            name="node-page", daemon=True,
        )  # fmt: skip

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        self._thread.start()
        if self.status.earnings is not None:
            self.status.earnings.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.status.earnings is not None:
            self.status.earnings.stop()


def start_dashboard(
    config: dict[str, Any], host: str, port: int, data_dir: Path | None
) -> tuple[Dashboard | None, str | None]:
    """(the running page or None, a warning or None). The node runs on when the port is
    taken: earning matters more than its page, and the warning says how to pick another."""
    mqtt = config.get("mqtt") or {}
    hub = config.get("hub")
    earnings = (
        Earnings(hub, str(config["node_id"]), mqtt.get("password"), data_dir, ca=config.get("ca"))
        if isinstance(hub, str) and hub
        else None  # no hub to ask: the page shows no credits
    )
    try:
        board = Dashboard(NodeStatus(config, earnings), host, port)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            what = "is in use (by another node, or another program)"
        else:
            what = f"cannot be served: {e.strerror or e}"
        return None, (
            f"node page not started: {host}:{port} {what}; the node runs without it. "
            "Pick a free port with --dashboard-port PORT (0 turns the page off)"
        )
    board.start()
    return board, None
