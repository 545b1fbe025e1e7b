"""The node's credits as the hub counts them, for the node's own page (edge/dashboard.py):
fetched in a thread of its own from GET /api/v1/nodes/<id> with the node's credentials, and
"earned today" as the rise of that total since this machine's local midnight.

The hub keeps one authoritative counter per node (every pay path adds to it), so the node
records the total it first sees each day in earnings-day.json beside node.json; a restart
keeps the day's baseline. Credits settled between midnight and the first reading after it (at
most one poll, a minute) count for the day before. CPython only.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from edge.enroll import tls_context

log = logging.getLogger("edge.earnings")

MICRO = 1_000_000
EARNINGS_EVERY_S = 60.0  # how often the hub is asked, when nothing happened
EARNINGS_BURST_S = 15.0  # after a job finishes: ask every second until its pay shows up
# The hub pays 100 credits per day of proved availability (docs/economy.md, "Staying
# online"); the node's view gives its paid uptime in seconds, not in credits, so the page
# shows uptime's share at this rate (less when its owner's daily cap cut it).
UPTIME_MICRO_PER_S = 100 * MICRO / 86400
RECENT_DAYS = 7  # the recent average, per day, over this many days (BOINC shows one too)


def to_micro(text: object) -> int:
    """A hub amount ("1.25") in micro-credits; ValueError when it is not one."""
    try:
        value = Decimal(str(text)) * MICRO
    except InvalidOperation:
        raise ValueError(f"not an amount of credits: {text!r}") from None
    if not value.is_finite() or value < 0 or value != value.to_integral_value():
        raise ValueError(f"not an amount of credits: {text!r}")
    return int(value)


def rounded(amount: int) -> str:
    """An amount to a sensible precision, as the hub's pages show it: two decimals, three
    significant digits below 0.01 (0.002777 is 0.00278); the exact one goes in a title."""
    if not amount:
        return "0"
    n = amount / MICRO
    if abs(n) >= 0.01:
        text = f"{n:.2f}"
        return text[:-3] if text.endswith(".00") else text
    return f"{n:.3g}" if abs(n) >= 1e-4 else format_micro(amount)


def format_micro(amount: int) -> str:
    """As the hub writes amounts: 2_500_000 -> "2.5", 10_000_000 -> "10"."""
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), MICRO)
    return f"{sign}{whole}" if not frac else f"{sign}{whole}.{frac:06d}".rstrip("0")


def _days_ago(n: int) -> str:
    """The local date n days before today, as the day file writes dates."""
    return time.strftime("%Y-%m-%d", time.localtime(time.time() - n * 86400))


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
        ca: str | None = None,
    ) -> None:
        self.url = hub.rstrip("/") + "/api/v1/nodes/" + node_id
        # an https:// hub: verified against the CA the node pinned (node.json's "ca")
        self._context = tls_context(ca) if self.url.lower().startswith("https:") else None
        token = base64.b64encode(f"{node_id}:{password or ''}".encode()).decode()
        self._auth = "Basic " + token
        self.baseline_path = data_dir / "earnings-day.json" if data_dir else None
        self.every_s = every_s
        self.timeout_s = timeout_s
        self._view: dict[str, Any] = {"total": None, "today": None, "updated_at": None,
                                      "error": None, "hub_state": None}  # fmt: skip
        self._baseline: tuple[str, int] | None = None
        self._days: dict[str, int] = {}  # the first total seen on each recent day
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
            with urllib.request.urlopen(req, timeout=self.timeout_s, context=self._context) as resp:
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
        # Uptime's share from the paid seconds at the hub's rate, never more than the total;
        # the rest is work (jobs, replicas and service hours).
        uptime = min(total, int(int(data.get("uptime_s") or 0) * UPTIME_MICRO_PER_S))
        days = [d for d in sorted(self._days) if d >= _days_ago(RECENT_DAYS - 1)]
        recent = total - self._days[days[0]] if days else today
        self._view = {
            "total": format_micro(total),
            "today": format_micro(today),
            "total_micro": total,
            "today_micro": today,
            "work_micro": total - uptime,
            "uptime_micro": uptime,
            # Since the first reading of the oldest of the last RECENT_DAYS days (today
            # included) and its average per day over the days this node has seen.
            "recent_micro": recent,
            "recent_days": max(1, len(days)),
            "per_day_micro": recent // max(1, len(days)),
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
                self._days = {str(d): int(v) for d, v in dict(saved.get("days") or {}).items()}
            except (OSError, ValueError, KeyError, TypeError):
                self._baseline = None  # none yet, or unreadable: start the day now
        if self._baseline is None or self._baseline[0] != day or self._baseline[1] > total:
            # A new day, or a total that went down (the hub's books were reset): start again.
            if self._baseline is not None and self._baseline[1] > total:
                self._days = {}
            self._baseline = (day, total)
            self._days[day] = total
            self._days = {d: t for d, t in self._days.items() if d >= _days_ago(RECENT_DAYS)}
            self._save_baseline()
        return self._baseline[1]

    def _save_baseline(self) -> None:
        if self.baseline_path is None or self._baseline is None:
            return
        tmp = self.baseline_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"day": self._baseline[0], "start_micro": self._baseline[1],
                                       "days": self._days}))  # fmt: skip
            os.replace(tmp, self.baseline_path)
        except OSError as e:
            log.warning("cannot keep today's earnings baseline in %s: %s", self.baseline_path, e)
