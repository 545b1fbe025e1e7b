"""Template filters: times, durations, sizes and query strings as a person reads them."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from markupsafe import Markup, escape

from hub.ledger.money import MICRO, credits_to_micro, format_micro


def ago(t: float | None) -> str:
    if not t:
        return "—"
    s = max(0.0, time.time() - float(t))
    if s < 5:
        return "just now"
    if s < 60:
        return f"{int(s)} s ago"
    if s < 3600:
        return f"{int(s // 60)} min ago"
    if s < 86400:
        return f"{int(s // 3600)} h ago"
    return f"{int(s // 86400)} days ago"


def when(t: float | None) -> str:
    if not t:
        return "—"
    return datetime.fromtimestamp(float(t), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def clock(t: float | None) -> str:
    """A time of day to the tenth of a second (heartbeats come several a second)."""
    if not t:
        return "—"
    return datetime.fromtimestamp(float(t), UTC).strftime("%H:%M:%S.%f")[:-5] + " UTC"


def dur(s: float | None) -> str:
    if s is None:
        return "—"
    s = float(s)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def mb(n: float | None) -> str:
    n = float(n or 0)
    return f"{n / 1024:.1f} GB" if n >= 1024 else f"{n:.0f} MB"


def gpus(listed: list[dict[str, Any]] | None) -> str:
    """A node's GPUs in a line: '1 GPU · NVIDIA L4 22.5 GB', '3 GPUs · 2x NVIDIA L4 22.5 GB,
    NVIDIA T4 15.0 GB'; '' for none."""
    if not listed:
        return ""
    models: dict[str, int] = {}
    for g in listed:
        model = g.get("name") or "GPU"
        if g.get("memory_mb"):
            model += " " + mb(g["memory_mb"])
        models[model] = models.get(model, 0) + 1
    kinds = ", ".join(f"{n}x {m}" if n > 1 else m for m, n in models.items())
    return f"{len(listed)} GPU{'s' if len(listed) > 1 else ''} · {kinds}"


def score(v: float | None) -> str:
    """A reputation (0..1) to two decimals, '0.59'; the exact value goes in a title."""
    if v is None:
        return "—"
    return f"{float(v):.2f}"


def credits(micro: int | str | None) -> str:
    """An amount of µc to a sensible precision: two decimals, or three significant digits
    below 0.01 credits (a job of 0.002777 is 0.00278, not 0.00). A string is an exact amount
    in credits as format_micro writes it (the wallet's balance and held). hub/static/app.js
    (credits) rounds the live updates by the same rule."""
    if isinstance(micro, str):
        micro = credits_to_micro(micro)
    if not micro:
        return "0"
    n = int(micro) / MICRO
    if abs(n) >= 0.01:
        text = f"{n:,.2f}"
        return text[:-3] if text.endswith(".00") else text
    return f"{n:.3g}" if abs(n) >= 1e-4 else f"{n:.6f}".rstrip("0")


def money(micro: int | None, sign: bool = False) -> Markup:
    """An amount rounded as `credits` does, with the exact value on hover."""
    micro = int(micro or 0)
    plus = "+" if sign and micro > 0 else ""
    return Markup('<span class="money" title="{exact} credits">{plus}{shown}</span>').format(
        exact=plus + format_micro(micro), plus=plus, shown=escape(credits(micro))
    )


def qs(params: dict[str, Any]) -> str:
    return urlencode({k: v for k, v in params.items() if v})


def install(env: jinja2.Environment, static_dir: Path) -> None:
    env.filters.update(
        ago=ago,
        when=when,
        clock=clock,
        dur=dur,
        mb=mb,
        gpus=gpus,
        qs=qs,
        score=score,
        credits=credits,
        money=money,
    )

    # Cache-busting by file modification time: a new hub version never serves stale scripts.
    def static(name: str) -> str:
        try:
            version = int((static_dir / name).stat().st_mtime)
        except OSError:
            version = 0
        return f"/static/{name}?v={version}"

    env.globals["static"] = static
