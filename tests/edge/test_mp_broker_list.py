"""A board given a broker cluster's servers (a comma-separated `--mqtt-public-url`, as a hub of
replicas hands it out at enrollment) connects to the first one, on the firmware itself, rather
than failing to read the URL. It does not move to another server: edge-run does that."""

from __future__ import annotations

import subprocess

import pytest

CODE = """
from edge.core.mqtt_umqtt import UmqttMqtt
for url in {urls!r}:
    try:
        m = UmqttMqtt(url)
        print(m.host, m.port)
    except ValueError as e:
        print("refused:", e)
"""


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mqtt://10.0.0.1:1883,mqtt://10.0.0.2:1884", "10.0.0.1 1883"),
        (" mqtt://broker-a:8883 , mqtt://broker-b:8883", "broker-a 8883"),
        ("mqtt://only:1883", "only 1883"),
        ("broker-a:1883,mqtt://b:1", "refused: MQTT URL must look like mqtt://host:port"),
    ],
)
def test_a_board_takes_the_first_server_of_a_list(micropython: str, url: str, says: str) -> None:
    out = subprocess.run(
        [micropython, "-c", CODE.format(urls=[url])], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(says), out.stdout
