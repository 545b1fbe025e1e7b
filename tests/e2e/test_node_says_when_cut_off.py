"""A CPython node says, without -v, when it loses the hub's broker and when it has it again
(issue 19: it printed nothing either way). The broker is a real Mosquitto, stopped and
started again on its port under a running hub and node."""

from __future__ import annotations

from pathlib import Path

from deparrow.localnet import wait_for
from hub.mqtt.broker import ChildBroker, free_port
from tests.conftest import require_mosquitto, start_hub


def test_edge_run_prints_a_line_when_the_broker_goes_and_comes_back(tmp_path: Path) -> None:
    require_mosquitto()
    broker = ChildBroker("mosquitto", "127.0.0.1", free_port(), tmp_path / "mosquitto")
    broker.start()
    hub = start_hub(tmp_path, mqtt_url=broker.url)
    try:
        _alice, owner = hub.user("alice")
        node = hub.start_node(owner, tmp_path / "n1", "n1", wait_s=30, verbose=False)
        try:
            assert "lost the hub's broker" not in node.output()
            broker.stop()
            lost = f"edge-run: lost the hub's broker at {broker.url}; reconnecting"
            wait_for("the node to say it is cut off", lambda: lost in node.output(), 30, [node])
            broker.start()
            back = f"edge-run: connected to the hub's broker at {broker.url} again"
            wait_for("the node to say it is back", lambda: back in node.output(), 60, [node])
            wait_for(
                "the node to be idle again",
                lambda: [n["state"] for n in owner.nodes()] == ["idle"],
                30,
                [node, hub.proc],
            )
            out = node.output()
            assert out.count(lost) == 1 and out.count(back) == 1, out
        finally:
            node.stop()
    finally:
        hub.stop()
        broker.stop()
