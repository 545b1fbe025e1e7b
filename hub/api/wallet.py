"""REST routes of credits: a user's wallet, its history and transfers, and the ledger's audit."""

from __future__ import annotations

import csv
import io
from typing import Any

import msgspec
from aiohttp import web

from hub.api.http import (
    _services,
    decode_body,
    error,
    identity,
    json_response,
    query_int,
    require_admin,
)
from hub.api.types import (
    HistoryItem,
    TransferRequest,
    TransferResponse,
    WalletView,
)
from hub.ledger import reports
from hub.ledger.money import INT64_MAX, credits_to_micro, format_micro
from hub.market.jobs import wallet_of

MAX_HISTORY = 1000  # entries per page of a wallet's history


async def wallet(request: web.Request) -> web.Response:
    who = identity(request)
    services = _services(request)
    account = wallet_of(who.user_id)
    balance = services.ledger.balance(account)
    held = services.ledger.held_for(account)
    return json_response(
        WalletView(
            owner=who.user_id,
            balance=format_micro(balance),
            held=format_micro(held),
            balance_micro=balance,
            held_micro=held,
        )
    )


async def wallet_history(request: web.Request) -> web.StreamResponse:
    who = identity(request)
    ledger = _services(request).ledger
    limit = query_int(request, "limit", 1, MAX_HISTORY, default=50)
    before = query_int(request, "before", 1, INT64_MAX)  # an entry number
    output = request.query.get("format", "json")
    if output not in ("json", "csv"):
        return error(400, f"format must be json or csv, not {output!r}", field="format")
    account = wallet_of(who.user_id)
    rows = ledger.history(account, limit=limit, before_entry_id=before)
    lines = reports.describe(_services(request).db, account, rows)
    if output == "csv":
        buf = io.StringIO()
        out = csv.writer(buf)
        out.writerow(reports.CSV_HEADER)
        out.writerows(reports.csv_row(line) for line in lines)
        return web.Response(
            text=buf.getvalue(), content_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="wallet-history.csv"'},
        )  # fmt: skip
    # A job's hold and its return are one line: a page may hold fewer lines than `limit`,
    # and the next page starts below the last entry read.
    next_before = rows[-1].entry_id if len(rows) == limit else None
    return json_response({"items": [_item(line) for line in lines], "next_before": next_before})


def _item(line: reports.Line) -> dict[str, Any]:
    """A history line in JSON: the ledger's fields (`reason` is the ledger's) and how a
    person reads it (`description`, `category`; a finished job's `held` and `came_back`)."""
    item = msgspec.structs.asdict(
        HistoryItem(entry=line.entry_id, at=line.created_at, reason=line.reason,
                    amount=format_micro(line.amount),
                    balance_after=format_micro(line.balance_after),
                    counterparties=list(line.counterparties))
    )  # fmt: skip
    item.update(description=line.text, category=line.category)
    if line.category in ("compute", "calls"):
        item.update(held=format_micro(line.held), came_back=format_micro(line.back))
    if line.link is not None:
        item["link"] = {"kind": line.link[0], "id": line.link[1]}
    return item


async def wallet_transfer(request: web.Request) -> web.Response:
    who = identity(request)
    services = _services(request)
    key = request.headers.get("Idempotency-Key")
    if not key or len(key) > 128:
        return error(
            400, "an Idempotency-Key header (1 to 128 characters) is required: retrying with "
            "the same key never moves credits twice", field="Idempotency-Key",
        )  # fmt: skip
    req = await decode_body(request, TransferRequest)
    amount = credits_to_micro(req.amount)
    if amount <= 0:
        return error(400, f"amount must be more than 0 credits, not {req.amount}", field="amount")
    if req.to == who.user_id:
        return error(400, "you cannot transfer to yourself", field="to")
    if services.store.user(req.to) is None:
        return error(404, f"no user or agent {req.to}", field="to")
    src, dst = wallet_of(who.user_id), wallet_of(req.to)
    ledger = services.ledger
    ledger.open_account(dst, "wallet", req.to)
    memo = {"memo": req.memo} if req.memo else None
    # Through the writer: concurrent transfers share one durable commit, and the answer is
    # sent only once that commit is on disk.
    entry = await services.writer.transfer(
        f"transfer:{who.user_id}:{key}", src, dst, amount, f"transfer to {req.to}", memo=memo,
        same_memo=True,  # the same key with another memo is another request: 409
    )  # fmt: skip
    return json_response(
        TransferResponse(entry=entry.id, to=req.to, amount=format_micro(amount),
                         balance=format_micro(services.ledger.balance(src)),
                         replayed=entry.replayed),
        200 if entry.replayed else 201,
    )  # fmt: skip


async def ledger_audit(request: web.Request) -> web.Response:
    require_admin(request)
    ledger = _services(request).ledger
    audit = ledger.audit()
    return json_response(
        {
            "balanced": audit.balanced,
            "total": format_micro(audit.total),
            "by_kind": {k: format_micro(v) for k, v in audit.by_kind.items()},
            "mismatches": [m.account for m in audit.mismatches],
            "negatives": [a for a, _ in audit.negatives],
            "unbalanced_entries": list(audit.unbalanced_entries),
            "stranded_holds": list(audit.stranded_holds),
            "entries": audit.entries,
            "accounts": [
                {
                    "id": a["id"],
                    "kind": a["kind"],
                    "owner": a["owner"],
                    "balance": format_micro(int(a["balance"])),
                }
                for a in ledger.accounts()
            ],
        }
    )
