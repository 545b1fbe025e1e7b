"""`deparrow demo`: the whole loop on one machine, checked.

A hub on embedded defaults in a temporary directory, two edge nodes owned by one user, a
second user who submits every example job; then each result is compared with its expected
output, and the ledger is audited. Exit 0 only when every job is right and the books balance.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import wasm_jobs
from deparrow.client import HubError
from deparrow.localnet import LocalHub, Proc, wait_for


def spec_for(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "engine": {
            "type": "wasm",
            "module": "example:" + name,
            "entrypoint": entry.get("entrypoint", "_start"),
            "args": [str(a) for a in entry.get("args", [])],
            "env": entry.get("env", {}),
        },
        "resources": {"cpu": 1, "memory_mb": 64},
        "timeout": 30,
    }
    if entry.get("stdin"):
        import base64

        spec["input"] = (
            "base64:" + base64.b64encode(wasm_jobs.path(entry["stdin"]).read_bytes()).decode()
        )
    return spec


def check_result(entry: dict[str, Any], job: dict[str, Any]) -> str | None:
    """None when the job did what its manifest expects; else what differs."""
    if job["state"] != "completed":
        return f"state {job['state']}: {job.get('reason') or ''}"
    expected = entry.get("expected", {})
    result = job["result"] or {}
    for key in ("stdout", "returns", "exit_code"):
        if key in expected and expected[key] is not None and result.get(key) != expected[key]:
            return f"{key} is {result.get(key)!r}, expected {expected[key]!r}"
    return None


def run_demo(as_json: bool, keep: bool, broker: str, echo: Callable[[str], None]) -> bool:
    tmp = Path(tempfile.mkdtemp(prefix="deparrow-demo-"))
    procs: list[Proc] = []
    report: dict[str, Any] = {
        "jobs": [],
        "balances": {},
        "ledger_balanced": False,
        "data_dir": str(tmp),
    }
    ok = False
    try:
        echo(f"starting a hub (data in {tmp})")
        hub = LocalHub(tmp / "hub", broker=broker, heartbeat_s=1.0)
        procs.append(hub.proc)
        status = hub.admin.status()
        report["broker"] = status["broker"]["kind"]
        echo(
            f"hub up on {hub.url}; MQTT broker: {status['broker']['kind']}"
            f" at {status['broker']['url']}"
        )
        admin = hub.admin
        owner, owner_client = hub.user("node-owner")
        alice, alice_client = hub.user("alice")
        echo(
            f"users: alice ({alice['id']}, welcome grant {alice['welcome_grant']} credits), "
            f"node-owner ({owner['id']})"
        )
        for i in (1, 2):
            procs.append(hub.start_node(owner_client, tmp / f"node{i}", f"demo-node-{i}"))
        wait_for(
            "two nodes online",
            lambda: sum(n["state"] != "offline" for n in owner_client.nodes()) == 2,
            30,
            procs,
        )
        echo("two nodes online")

        examples = wasm_jobs.examples()
        submitted = []
        for name, entry in examples:
            job = alice_client.submit(spec_for(name, entry))
            submitted.append((name, entry, job["id"]))
            echo(f"submitted {name:<8} {job['id']}  hold {job['hold']} credits")
        all_right = True
        for name, entry, job_id in submitted:
            job = alice_client.wait(job_id, timeout_s=120)
            problem = check_result(entry, job)
            all_right &= problem is None
            result = job.get("result") or {}
            shown = (
                " ".join(map(str, result["returns"]))
                if result.get("returns") is not None
                else (result.get("stdout") or "").strip()
            )
            report["jobs"].append(
                {
                    "id": job_id,
                    "name": name,
                    "state": job["state"],
                    "node": job["node"],
                    "result": shown,
                    "stdout": result.get("stdout"),
                    "returns": result.get("returns"),
                    "exit_code": result.get("exit_code"),
                    "cost": job["cost"],
                    "correct": problem is None,
                    "problem": problem,
                }
            )
            mark = "ok " if problem is None else "BAD"
            echo(
                f"{mark} {name:<8} {job['state']:<9} on {job['node']}  cost {job['cost']}  "
                f"-> {shown[:70]}" + (f"  [{problem}]" if problem else "")
            )

        nodes = owner_client.nodes()
        report["nodes"] = [{"id": n["id"], "name": n["name"], "earned": n["earned"]} for n in nodes]
        for n in nodes:
            echo(f"node {n['name']} ({n['id']}) earned {n['earned']} credits")
        audit = admin.request("GET", "/api/v1/ledger/audit")
        for acct in audit["accounts"]:
            report["balances"][acct["id"]] = acct["balance"]
        report["balances_by_user"] = {
            "alice": alice_client.wallet()["balance"],
            "node-owner": owner_client.wallet()["balance"],
        }
        report["ledger_balanced"] = bool(audit["balanced"])
        echo(
            f"balances: alice {report['balances_by_user']['alice']}, node-owner "
            f"{report['balances_by_user']['node-owner']}, mint {report['balances'].get('mint')}"
        )
        echo(
            "ledger "
            + (
                "balanced: all accounts sum to zero"
                if audit["balanced"]
                else f"NOT balanced: {audit}"
            )
        )
        ok = all_right and bool(audit["balanced"])
    except (HubError, RuntimeError) as e:
        report["error"] = str(e)
        echo(f"demo failed: {e}")
    finally:
        _clean_up(procs, tmp, keep, ok, echo)
    return _report("demo", report, ok, as_json, echo)


def _clean_up(
    procs: list[Proc], tmp: Path, keep: bool, ok: bool, echo: Callable[[str], None]
) -> None:
    """Stop what the demo started; keep its files (and say where) when it failed."""
    for p in reversed(procs):
        p.stop()
    if not keep and ok:
        shutil.rmtree(tmp, ignore_errors=True)
    elif not ok:
        echo(f"logs kept in {tmp}")


def _report(
    what: str, report: dict[str, Any], ok: bool, as_json: bool, echo: Callable[[str], None]
) -> bool:
    report["ok"] = ok
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        echo(what + (" passed" if ok else " FAILED"))
    return ok


def run_agents_demo(as_json: bool, keep: bool, broker: str, echo: Callable[[str], None]) -> bool:
    """`deparrow demo --agents`: a hub (service periods of 2 s) and two nodes, then the example
    economy of examples/agents/ (deparrow.examples.economy): a seller of a Wasm-backed service,
    a buyer, and an agent that pays for its own service job until it is broke. Ends with the
    ledger audit; exit 0 only when the loop checked out and the books balance."""
    from deparrow import DeparrowError
    from deparrow.examples.economy import run_economy

    tmp = Path(tempfile.mkdtemp(prefix="deparrow-agents-demo-"))
    procs: list[Proc] = []
    report: dict[str, Any] = {"ledger_balanced": False, "data_dir": str(tmp)}
    ok = False
    try:
        echo(f"starting a hub (data in {tmp})")
        hub = LocalHub(tmp / "hub", broker=broker, heartbeat_s=0.5,
                       extra=("--service-period", "2"))  # fmt: skip
        procs.append(hub.proc)
        report["broker"] = hub.admin.status()["broker"]["kind"]
        _, owner_client = hub.user("node-owner")
        alice, _ = hub.user("alice")
        for i in (1, 2):
            procs.append(hub.start_node(owner_client, tmp / f"node{i}", f"demo-node-{i}"))
        echo(f"hub up on {hub.url} ({report['broker']} broker), two nodes online")
        report.update(run_economy(hub.url, alice["token"], echo))
        audit = hub.admin.audit()
        report["ledger_balanced"] = bool(audit["balanced"])
        report["balances"] = {a["id"]: a["balance"] for a in audit["accounts"]}
        echo("ledger " + ("balanced: all accounts sum to zero" if audit["balanced"]
                          else f"NOT balanced: {audit}"))  # fmt: skip
        ok = bool(report["ok"]) and report["ledger_balanced"]
    except (HubError, RuntimeError, DeparrowError) as e:
        report["error"] = str(e)
        echo(f"demo failed: {e}")
    finally:
        _clean_up(procs, tmp, keep, ok, echo)
    return _report("agents demo", report, ok, as_json, echo)
