"""The node's own page: its state, the jobs it ran, the credits it earned.

`edge-run --dashboard-port 8080` serves it on 127.0.0.1 (an HTML page at /, the same data as
JSON at /api/state). The node loop never waits for it: the loop calls NodeStatus.observe()
each turn, which only compares a few counters and, when something changed (or once a second),
swaps in a new snapshot dict; the server threads read that reference. Credits come from the
hub (GET /api/v1/nodes/<id> with the node's own credentials) in a third thread.

"Earned today" is the rise of the hub's total since this machine's local midnight. The hub
keeps one authoritative counter per node (every pay path adds to it), so the node records the
total it first sees each day in earnings-day.json beside node.json; a restart keeps the day's
baseline. Credits settled between midnight and the first reading after it (at most one poll,
a minute) count for the day before.

CPython only (http.server, threads, urllib); a board serves its own page.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import errno
import html
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("edge.dashboard")

MICRO = 1_000_000
RECENT = 20  # finished jobs listed on the page
EARNINGS_EVERY_S = 60.0  # how often the hub is asked, when nothing happened
EARNINGS_BURST_S = 15.0  # after a job finishes: ask every second until its pay shows up
REBUILD_EVERY_S = 1.0  # refresh uptime and ages even when no counter moved
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def to_micro(text: object) -> int:
    """A hub amount ("1.25") in micro-credits; ValueError when it is not one."""
    try:
        value = Decimal(str(text)) * MICRO
    except InvalidOperation:
        raise ValueError(f"not an amount of credits: {text!r}") from None
    if not value.is_finite() or value < 0 or value != value.to_integral_value():
        raise ValueError(f"not an amount of credits: {text!r}")
    return int(value)


def format_micro(amount: int) -> str:
    """As the hub writes amounts: 2_500_000 -> "2.5", 10_000_000 -> "10"."""
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), MICRO)
    return f"{sign}{whole}" if not frac else f"{sign}{whole}.{frac:06d}".rstrip("0")


class Earnings:
    """The node's credits, fetched from the hub in a thread of its own."""

    def __init__(
        self,
        hub: str,
        node_id: str,
        password: str | None,
        data_dir: Path | None,
        every_s: float = EARNINGS_EVERY_S,
        timeout_s: float = 10.0,
    ) -> None:
        self.url = hub.rstrip("/") + "/api/v1/nodes/" + node_id
        token = base64.b64encode(f"{node_id}:{password or ''}".encode()).decode()
        self._auth = "Basic " + token
        self.baseline_path = data_dir / "earnings-day.json" if data_dir else None
        self.every_s = every_s
        self.timeout_s = timeout_s
        self._view: dict[str, Any] = {"total": None, "today": None, "updated_at": None,
                                      "error": None, "hub_state": None}  # fmt: skip
        self._baseline: tuple[str, int] | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._burst_until = 0.0
        self._total_at_burst: int | None = None
        self._thread: threading.Thread | None = None

    def view(self) -> dict[str, Any]:
        return dict(self._view)

    def soon(self) -> None:
        """A job finished: look every second until its pay shows up (or the burst ends)."""
        self._total_at_burst = self._view.get("total_micro")
        self._burst_until = time.monotonic() + EARNINGS_BURST_S
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="earnings", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            # A reading in flight to an unreachable hub must not hold the node's exit back:
            # the thread is a daemon and dies with the process.
            self._thread.join(0.5)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.fetch()
            bursting = time.monotonic() < self._burst_until
            if bursting and self._view.get("total_micro") != self._total_at_burst:
                self._burst_until = 0.0  # the pay arrived
                bursting = False
            self._wake.wait(1.0 if bursting else self.every_s)
            self._wake.clear()

    def fetch(self) -> None:
        """One reading; failures are shown on the page, never raised."""
        req = urllib.request.Request(self.url, headers={"Authorization": self._auth})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                data = json.loads(resp.read())
            total = to_micro(data["earned"])
        except urllib.error.HTTPError as e:
            detail = ""
            with contextlib.suppress(ValueError, AttributeError):
                detail = ": " + str(json.loads(e.read()).get("error"))
            self._failed(f"the hub answered HTTP {e.code}{detail}")
            return
        except (urllib.error.URLError, OSError) as e:
            self._failed(f"cannot reach the hub: {getattr(e, 'reason', e)}")
            return
        except (ValueError, KeyError, TypeError) as e:
            self._failed(f"the hub's answer is not a node's earnings ({e})")
            return
        today = total - self._day_start(total)
        self._view = {
            "total": format_micro(total),
            "today": format_micro(today),
            "total_micro": total,
            "today_micro": today,
            "updated_at": time.time(),
            "error": None,
            "hub_state": data.get("state"),
        }

    def _failed(self, why: str) -> None:
        self._view = {**self._view, "error": why}
        log.info("earnings: %s", why)

    def _day_start(self, total: int) -> int:
        """The total at this day's first reading (local time), kept across restarts."""
        day = time.strftime("%Y-%m-%d")
        if self._baseline is None and self.baseline_path is not None:
            try:
                saved = json.loads(self.baseline_path.read_text())
                self._baseline = (str(saved["day"]), int(saved["start_micro"]))
            except (OSError, ValueError, KeyError, TypeError):
                self._baseline = None  # none yet, or unreadable: start the day now
        if self._baseline is None or self._baseline[0] != day or self._baseline[1] > total:
            # A new day, or a total that went down (the hub's books were reset): start again.
            self._baseline = (day, total)
            self._save_baseline()
        return self._baseline[1]

    def _save_baseline(self) -> None:
        if self.baseline_path is None or self._baseline is None:
            return
        tmp = self.baseline_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"day": self._baseline[0], "start_micro": self._baseline[1]}))
            os.replace(tmp, self.baseline_path)
        except OSError as e:
            log.warning("cannot keep today's earnings baseline in %s: %s", self.baseline_path, e)


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
    if earn.get("total") is not None:
        credits = (
            f"<b id='today'>{e(earn['today'])}</b> today · "
            f"<b id='total'>{e(earn['total'])}</b> in total"
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
        f"<tr><th>credits</th><td>{credits}</td></tr>"
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
        Earnings(hub, str(config["node_id"]), mqtt.get("password"), data_dir)
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
