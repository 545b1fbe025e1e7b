"""What the hub says about its broker connection: the first connection is not a
"reconnected" (issue 19: it was logged on start-up, because the keepalive task already
ran), and a connection lost and regained is logged as both."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from hub.mqtt.broker import ChildBroker, free_port
from hub.mqtt.link import Link
from tests.conftest import require_mosquitto


def test_first_connection_is_not_a_reconnection_and_a_real_one_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_mosquitto()
    port = free_port()
    broker = ChildBroker("mosquitto", "127.0.0.1", port, tmp_path / "mosquitto")
    broker.start()

    async def run() -> None:
        link = Link("127.0.0.1", port, lambda *_: None, max_read=100)
        await link.open(time.monotonic() + 10)
        keepalive = asyncio.create_task(link.keepalive())  # as the bridge starts it, first
        try:
            await link.accepted(10)
            await asyncio.sleep(0.5)
            assert "reconnected" not in caplog.text
            broker.stop()
            broker.start()  # same port: the link finds it again
            deadline = time.monotonic() + 20
            while "reconnected" not in caplog.text and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            link.stopping = True
            keepalive.cancel()
            if link.reconnecting is not None:
                link.reconnecting.cancel()
            link.close()

    with caplog.at_level(logging.INFO, logger="hub.mqtt.bridge"):
        try:
            asyncio.run(run())
        finally:
            broker.stop()
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("hub lost the MQTT broker") for m in said), said
    assert said.count("hub reconnected to the MQTT broker") == 1, said
