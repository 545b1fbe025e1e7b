"""The dashboard's forms: turn posted fields into the inputs of the jobs service and the
ledger (a JobSpec, a transfer), with a message per field a person can act on. The rules
themselves (prices, limits, funds) are the libraries'; this module only asks them."""

from __future__ import annotations

import base64
import re
import secrets
import shlex
from pathlib import PurePath
from typing import Any

import msgspec
from multidict import MultiDictProxy

import wasm_jobs
from hub.ledger import economy
from hub.ledger.money import (
    InsufficientFunds,
    LedgerError,
    UnknownAccount,
    credits_to_micro,
    format_micro,
)
from hub.market.jobs import wallet_of
from hub.market.spec import JobSpec, error_field
from hub.web import queries

PREVIEW_CHARS = 4000
HISTORY_PAGE = 25
Form = dict[str, Any]
Errors = dict[str, str]

# Where a library's complaint about a spec field is shown on the submit form.
FIELD_OF = {
    "engine.module": "module",
    "engine": "module",
    "input": "module",
    "name": "module",
    "engine.entrypoint": "entrypoint",
    "engine.args": "args",
    "timeout": "timeout",
    "priority": "priority",
}


def new_key() -> str:
    """An idempotency key for one form: a double click or a resent form acts once."""
    return secrets.token_urlsafe(12)


def job_form_defaults() -> Form:
    name, job = wasm_jobs.examples()[0]
    return {"source": "example", "example": name, "entrypoint": job["entrypoint"],
            "args": " ".join(job["args"]), "priority": "normal", "timeout": "60",
            "module": "", "module_name": "", "key": new_key()}  # fmt: skip


def _field(post: MultiDictProxy[Any], name: str, default: str = "") -> str:
    value = post.get(name)
    return value.strip() if isinstance(value, str) else default


def _job_name(text: str) -> str:
    name = re.sub(r"[^\w.\- ]", "-", text).strip()[:128]
    return name or "job"


def parse_job_form(post: MultiDictProxy[Any], svc: Any) -> tuple[Form, Errors, JobSpec | None]:
    """The submit form's fields -> (the form to show again, errors by field, the spec)."""
    form: Form = {
        "source": "upload" if _field(post, "source") == "upload" else "example",
        "example": _field(post, "example"),
        "entrypoint": _field(post, "entrypoint") or "_start",
        "args": _field(post, "args"),
        "priority": _field(post, "priority") or "normal",
        "timeout": _field(post, "timeout") or "60",
        "module": _field(post, "module"),
        "module_name": _field(post, "module_name"),
        "key": _field(post, "key") or new_key(),
    }
    errors: Errors = {}
    spec: dict[str, Any] = {}
    if form["source"] == "example":
        examples = dict(wasm_jobs.examples())
        job = examples.get(form["example"])
        if job is None:
            errors["example"] = "Pick one of the example jobs from the list."
        else:
            spec["name"] = _job_name(form["example"])
            spec["engine_module"] = "example:" + form["example"]
            if job.get("stdin"):
                data = wasm_jobs.path(job["stdin"]).read_bytes()
                spec["input"] = "base64:" + base64.b64encode(data).decode()
    else:
        upload = post.get("file")
        filename = getattr(upload, "filename", "") or ""
        if filename:
            data = upload.file.read() if upload is not None else b""
            limit = svc.config.max_module_bytes
            if not data:
                errors["module"] = f"{filename} is empty. Choose the compiled .wasm file."
            elif len(data) > limit:
                errors["module"] = (
                    f"{filename} is {len(data):,} bytes; this hub takes modules up to "
                    f"{limit:,} bytes."
                )
            elif not data.startswith(b"\0asm"):
                errors["module"] = (
                    f"{filename} is not a WebAssembly module (a .wasm file starts with the "
                    "bytes \\0asm). Upload the compiled .wasm, not its source or a text file."
                )
            else:
                form["module"] = "sha256:" + svc.store.put_blob(data)
                form["module_name"] = filename
        if "module" not in errors:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", form["module"]):
                errors["module"] = "Choose a .wasm file to upload, or pick an example instead."
            else:
                spec["engine_module"] = form["module"]
                spec["name"] = _job_name(PurePath(form["module_name"] or "module").stem)
    try:
        args = shlex.split(form["args"])
    except ValueError as e:
        errors["args"] = f"Arguments: {e} (close the quote, or leave quotes out)."
        args = []
    if form["priority"] not in ("normal", "high"):
        errors["priority"] = "Priority is normal or high."
    # Plain ASCII digits only: int() would also take "1_0", "+5" and digits of other scripts.
    if not re.fullmatch(r"[0-9]{1,9}", form["timeout"]):
        errors["timeout"] = f"“{form['timeout']}” is not a whole number of seconds."
        timeout = 0
    else:
        timeout = int(form["timeout"])
        if not 1 <= timeout <= svc.config.max_timeout_s:
            errors["timeout"] = (
                f"The timeout is from 1 to {svc.config.max_timeout_s:,} seconds on this hub."
            )
    if errors or "engine_module" not in spec:
        return form, errors, None
    body = {
        "name": spec["name"],
        "engine": {"type": "wasm", "module": spec["engine_module"],
                   "entrypoint": form["entrypoint"], "args": args},
        "priority": form["priority"],
        "timeout": timeout,
    }  # fmt: skip
    if "input" in spec:
        body["input"] = spec["input"]
    try:
        return form, errors, msgspec.convert(body, JobSpec)
    except msgspec.ValidationError as e:
        field = FIELD_OF.get(error_field(str(e)) or "", "module")
        errors[field] = f"{e}"
        return form, errors, None


def job_price(spec: JobSpec) -> int:
    """The hold the jobs service will place for this batch job (its maximum price)."""
    return economy.max_price(spec.cpu_milli, spec.timeout, spec.priority)


def short_of(e: InsufficientFunds) -> str:
    return (
        f"Too few credits: this needs {format_micro(e.needed)} and your wallet has "
        f"{format_micro(e.available)} (short by {format_micro(e.shortfall)})."
    )


def parse_transfer(
    post: MultiDictProxy[Any], svc: Any, me: str
) -> tuple[Form, Errors, dict[str, Any] | None]:
    form: Form = {
        "to": _field(post, "to")[:64],
        "amount": _field(post, "amount")[:64],
        "memo": _field(post, "memo"),
        "key": _field(post, "key") or new_key(),
    }
    errors: Errors = {}
    if len(form["memo"]) > 200:
        errors["memo"] = f"The note is {len(form['memo'])} characters; keep it to 200."
    amount = 0
    if not form["amount"]:
        errors["amount"] = "Enter how many credits to send, such as 2.5."
    else:
        try:
            amount = credits_to_micro(form["amount"])
        except LedgerError:
            errors["amount"] = (
                f"“{form['amount']}” is not an amount of credits: write a number such as 2.5 "
                "(up to 6 decimals)."
            )
        else:
            if amount <= 0:
                errors["amount"] = "Send more than 0 credits."
    recipient = None
    if not form["to"]:
        errors["to"] = "Enter the user or agent id (u_...) or their exact name."
    else:
        recipient = queries.find_user(svc.db, form["to"])
        if recipient is None:
            errors["to"] = f"No user or agent “{form['to']}” here. Check the id (u_...)."
        elif recipient["id"] == me:
            errors["to"] = "That is you: pick someone else."
    try:
        balance = svc.ledger.balance(wallet_of(me))
    except UnknownAccount:
        balance = 0
    if "amount" not in errors and amount > balance:
        errors["amount"] = (
            f"Too few credits: you have {format_micro(balance)} to send (credits held for "
            "running jobs are not available)."
        )
    if errors or recipient is None:
        return form, errors, None
    return form, errors, {
        "to_id": recipient["id"], "to_name": recipient["name"], "to_role": recipient["role"],
        "amount": amount, "amount_text": format_micro(amount),
        "after": format_micro(balance - amount),
    }  # fmt: skip


def describe_account(account: str, names: dict[str, str]) -> dict[str, str | None]:
    """A counterparty of a history row, as a person would call it."""
    kind, _, ident = account.partition(":")
    if kind == "wallet":
        return {"label": names.get(ident, ident), "href": None}
    if kind == "hold":
        return {"label": "job " + ident, "href": "/jobs/" + ident}
    if account == "mint":
        return {"label": "the network", "href": None}
    if account == "revenue":
        return {"label": "hub fees", "href": None}
    return {"label": account, "href": None}
