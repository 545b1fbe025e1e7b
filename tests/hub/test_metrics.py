"""What an operator graphs and probes (docs/operations.md): /metrics scraped from a real hub
whose numbers move when a real node runs a job, /healthz and /readyz with the broker up and
down, JSON log lines, and the Grafana dashboard reading only metrics the hub exposes."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from deparrow.localnet import Proc
from hub.api.metrics import METRICS
from hub.api.services import SERVICES
from hub.app import create_app
from hub.config import HubConfig
from hub.mqtt.broker import ChildBroker, free_port
from tests.conftest import require_mosquitto, start_hub, start_node, wait_until
from tests.e2e.test_loop import spec

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "deparrow-hub.json"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain"), r.headers["Content-Type"]
        return parse(r.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_metrics_move_when_a_node_runs_a_job_and_logs_are_json(
    tmp_path: Path, mosquitto: str
) -> None:
    hub = start_hub(tmp_path, mqtt_url=mosquitto, extra=("--log-format", "json", "-v"))
    node: Proc | None = None
    try:
        before = scrape(hub.url)
        assert value(before, "deparrow_broker_connected") == 1
        assert value(before, "deparrow_jobs", state="completed") == 0
        assert value(before, "deparrow_settlement_seconds_count", since="submitted") == 0
        _, owner = hub.user("owner")
        _, alice = hub.user("alice")
        node = start_node(hub, owner, tmp_path, "n1")
        job = alice.submit(spec("fib"))
        done = alice.wait(job["id"], timeout_s=60)
        assert done["state"] == "completed", done
        # Heartbeats every 0.5 s: a second scrape a beat later has counted some.
        after = wait_until(
            "a heartbeat counted",
            lambda: (
                (s := scrape(hub.url))
                and value(s, "deparrow_heartbeats_total")
                > value(before, "deparrow_heartbeats_total")
                and s
            ),
        )
        assert value(after, "deparrow_jobs", state="completed") == 1
        assert value(after, "deparrow_queue_length") == 0
        assert value(after, "deparrow_queue_oldest_wait_seconds") == 0
        for since in ("submitted", "assigned"):
            assert value(after, "deparrow_settlement_seconds_count", since=since) == 1, since
        took = value(after, "deparrow_settlement_seconds_sum", since="submitted")
        assert 0 < took < 60
        assert value(after, "deparrow_nodes_online", engine="wasm") == 1
        assert value(after, "deparrow_nodes", state="idle") == 1
        submits = dict(method="POST", route="/api/v1/jobs", status="201")
        assert value(after, "deparrow_http_requests_total", **submits) == 1
        assert value(before, "deparrow_http_requests_total", **submits) == 0
        assert (
            value(after, "deparrow_http_request_duration_seconds_count", method="POST",
                  route="/api/v1/jobs") == 1
        )  # fmt: skip
        # client.wait polled the job under its route's pattern, never its own URL
        polled = value(
            after, "deparrow_http_requests_total",
            method="GET", route="/api/v1/jobs/{job_id}", status="200",
        )  # fmt: skip
        assert polled >= 1
        assert not any(job["id"] in dict(labels).get("route", "") for _, labels in after)
        assert value(after, "deparrow_ledger_batch_size_count") > value(
            before, "deparrow_ledger_batch_size_count"
        )
        assert value(after, "deparrow_ledger_commit_seconds_count") == value(
            after, "deparrow_ledger_batch_size_count"
        )
    finally:
        if node is not None:
            node.stop()
        hub.stop()
    # --log-format json: every line the hub wrote is one JSON object with the fields.
    lines = hub.proc.output().splitlines()
    assert lines
    records = []
    for line in lines:
        record = json.loads(line)  # a line that is not JSON fails here, naming itself
        assert {"ts", "level", "logger", "msg"} <= record.keys(), record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", record["ts"])
        records.append(record)
    assert any(r["msg"].startswith("DEparrow hub on http://") for r in records)
    settled = [r for r in records if r["msg"].startswith(f"result for {job['id']}")]
    assert settled, [r["msg"] for r in records]
    assert settled[0]["job"] == job["id"] and settled[0]["node"].startswith("n_"), settled[0]
    assigned = [r for r in records if r.get("job") == job["id"] and "->" in r["msg"]]
    assert assigned and assigned[0]["node"] == settled[0]["node"], assigned


def test_readyz_names_the_broker_when_it_stops(tmp_path: Path) -> None:
    require_mosquitto()
    broker = ChildBroker("mosquitto", "127.0.0.1", free_port(), tmp_path / "mosquitto")
    broker.start()
    hub = start_hub(tmp_path, mqtt_url=broker.url)
    try:
        assert get(hub.url + "/healthz") == (200, {"ok": True})
        status, body = get(hub.url + "/readyz")
        assert status == 200 and body["ready"] is True and body["leading"] is True
        broker.stop()
        _, body = wait_until(
            "/readyz to say the broker is down",
            lambda: (r := get(hub.url + "/readyz"))[0] == 503 and r,
            timeout_s=30,
        )
        assert body["ready"] is False
        assert set(body["not_ready"]) == {"broker"}, body
        assert broker.url.split("//")[1] in body["not_ready"]["broker"], body
        assert get(hub.url + "/healthz") == (200, {"ok": True})  # alive all the same
        assert value(scrape(hub.url), "deparrow_broker_connected") == 0
    finally:
        hub.stop()
        broker.stop()


async def test_health_and_route_patterns_in_process(
    api: Any, tmp_path: Path, mosquitto: str
) -> None:
    """The app factory as the API tests use it: a second app in the same process has its own
    registry (the global one would refuse its metrics twice), and URLs are counted under their
    route's pattern, or as "unmatched"."""
    other = create_app(HubConfig(data_dir=tmp_path / "other", mqtt_url=mosquitto))
    assert other[METRICS].registry is not api.app[METRICS].registry
    other[SERVICES].db.close()
    assert (await api.get("/healthz")).status == 200
    r = await api.get("/readyz")
    assert r.status == 200, await r.text()
    for path in ("/api/v1/jobs/j_nope1", "/api/v1/jobs/j_nope2", "/no/such/page/x1"):
        await api.get(path)
    samples = parse(await (await api.get("/metrics")).text())
    routes = {dict(labels).get("route") for name, labels in samples if "http" in name}
    assert "/api/v1/jobs/{job_id}" in routes and "unmatched" in routes, routes
    assert not any(r and ("nope" in r or "x1" in r) for r in routes), routes
    assert value(samples, "deparrow_broker_connected") == 1


def test_grafana_dashboard_reads_only_exposed_metrics(tmp_path: Path, mosquitto: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 8, exprs
    used = {name for e in exprs for name in re.findall(r"\bdeparrow_[a-z_]+", e)}
    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    try:
        with urllib.request.urlopen(hub.url + "/metrics", timeout=10) as r:
            families = list(text_string_to_metric_families(r.read().decode()))
    finally:
        hub.stop()
    exposed = set()
    for f in families:
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
        exposed |= {f.name + s for s in suffixes.get(f.type, ("",))}
    assert used <= exposed, used - exposed
    wanted = {
        "deparrow_jobs", "deparrow_queue_length", "deparrow_queue_oldest_wait_seconds",
        "deparrow_settlement_seconds_bucket", "deparrow_heartbeats_total",
        "deparrow_nodes_online", "deparrow_ledger_batch_size_bucket",
        "deparrow_ledger_commit_seconds_bucket", "deparrow_http_request_duration_seconds_bucket",
        "deparrow_broker_connected",
    }  # fmt: skip
    assert wanted <= used, wanted - used
