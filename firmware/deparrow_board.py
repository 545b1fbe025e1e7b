"""A DEparrow node on a microcontroller board (ESP32-S3 first), frozen into the firmware.

The board's filesystem holds what provisioning wrote (firmware/provision.py, or by hand with
mpremote): /node.json, the identity `edge-run` writes at enrollment, and /wifi.json,
{"ssid": ..., "psk": ...}. boot.py and main.py on the board call into this module:
main() connects Wi-Fi (network.WLAN, with retries), then runs the same edge core as
edge/mp_main.py (edge/core/session.py over umqtt.simple) with the wasm3 executor built into the
firmware (firmware/wasm3_exec.py over the `wasm3` C module).

Everything is feature-detected, never port-branched: without `network` (the unix port) Wi-Fi
is skipped with a message; without the `wasm3` C module the node falls back to the wasm3-run
program (edge/executors/wasm3_cli.py) where the port can start one. $DEPARROW_BOARD_ROOT
(where os.getenv exists) puts the board's root elsewhere, for tests on the unix port.
"""

try:
    import os
except ImportError:  # pragma: no cover
    import uos as os  # type: ignore[no-redef]

from edge.core import compat

WIFI_TRIES = 5
WIFI_WAIT_MS = 15000
STDOUT_CAP = 16 * 1024  # a job's output is kept in the board's heap
STDERR_CAP = 4 * 1024
OUTBOX_BYTES = 256 * 1024  # flash to spare for results waiting for the broker


class BoardError(Exception):
    """Something the board's owner must fix; the message says what."""


def say(msg):
    print("deparrow: " + msg)


def root():
    getenv = getattr(os, "getenv", None)
    r = (getenv("DEPARROW_BOARD_ROOT") if getenv else None) or "/"
    return r.rstrip("/")


def read_json(path, required):
    """The JSON object in `path`; None when it is absent and not required."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        if required:
            raise BoardError(
                path + " is missing: provision this board with "
                "'python firmware/provision.py --port PORT --hub URL --token TOKEN'"
            ) from None
        return None
    try:
        value = compat.json_loads(text)
    except ValueError:
        raise BoardError(path + " is not valid JSON: provision the board again") from None
    if not isinstance(value, dict):
        raise BoardError(path + " is not a JSON object: provision the board again")
    return value


def load_node(path):
    config = read_json(path, True)
    for key in ("node_id", "node_secret"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise BoardError(path + " lacks " + key + ": provision the board again")
    mqtt = config.get("mqtt")
    if not isinstance(mqtt, dict) or not isinstance(mqtt.get("url"), str):
        raise BoardError(path + " lacks mqtt.url: provision the board again")
    return config


def load_wifi(path):
    wifi = read_json(path, False)
    if wifi is None:
        return None
    if not isinstance(wifi.get("ssid"), str) or not wifi["ssid"]:
        raise BoardError(path + ' needs "ssid" (a string): provision the board again')
    if not isinstance(wifi.get("psk", ""), str):
        raise BoardError(path + ': "psk" must be a string')
    return wifi


def connect_wifi(wifi, tries=WIFI_TRIES, wait_ms=WIFI_WAIT_MS):
    """Joins the network in wifi.json; returns the board's address, or None without Wi-Fi."""
    try:
        import network
    except ImportError:
        say("this port has no 'network' module: Wi-Fi skipped (using the host's network)")
        return None
    if wifi is None:
        say("no wifi.json: Wi-Fi not configured (add one with firmware/provision.py --ssid)")
        return None
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    for attempt in range(1, tries + 1):
        if wlan.isconnected():
            break
        say(
            "joining Wi-Fi " + repr(wifi["ssid"]) + " (try " + str(attempt) + "/" + str(tries) + ")"
        )
        try:
            wlan.connect(wifi["ssid"], wifi.get("psk", ""))
        except OSError as e:
            say("Wi-Fi connect failed: " + repr(e))
        start = compat.ticks_ms()
        while not wlan.isconnected() and compat.ticks_diff(compat.ticks_ms(), start) < wait_ms:
            compat.sleep_ms(200)
        if not wlan.isconnected():
            status = wlan.status() if hasattr(wlan, "status") else "?"
            say("Wi-Fi " + repr(wifi["ssid"]) + " did not connect (status " + str(status) + ")")
            wlan.disconnect()
            compat.sleep_ms(min(1000 * attempt, 5000))
    if not wlan.isconnected():
        raise BoardError(
            "cannot join Wi-Fi " + repr(wifi["ssid"]) + " after " + str(tries)
            + " tries: check the name and password in wifi.json, and that the network is 2.4 GHz"
        )  # fmt: skip
    address = wlan.ifconfig()[0]
    say("Wi-Fi " + repr(wifi["ssid"]) + " connected, address " + address)
    return address


def make_executor(workdir):
    """The firmware's wasm3 module when the board has it, else the wasm3-run program."""
    try:
        from wasm3_exec import Wasm3ModuleExecutor
    except ImportError:
        Wasm3ModuleExecutor = None
    if Wasm3ModuleExecutor is not None:
        say("wasm jobs run in dpwasm3, in the firmware")
        return Wasm3ModuleExecutor(stdout_cap=STDOUT_CAP, stderr_cap=STDERR_CAP)
    try:
        from edge.executors.wasm3_cli import Wasm3CliExecutor
    except ImportError:
        raise BoardError(
            "this firmware has no wasm3 module: build it with firmware/build.sh"
        ) from None
    say("no wasm3 module in this firmware: jobs run in the wasm3-run program")
    return Wasm3CliExecutor(workdir, stdout_cap=STDOUT_CAP, stderr_cap=STDERR_CAP)


class Offered:
    """What the board offers: one CPU and the heap free for jobs."""

    def __init__(self, memory_mb):
        self.memory_mb = memory_mb

    def __call__(self, busy):
        return {"cpu": 1.0, "memory_mb": self.memory_mb, "gpu": 0, "load": 1.0 if busy else 0.0}


def heap_mb():
    try:
        import gc

        return max(1, (gc.mem_free() + gc.mem_alloc()) // (1024 * 1024))
    except (ImportError, AttributeError):
        return 1


def main(exit_after=None, verbose=False):
    """Starts the node and serves until Ctrl-C (or `exit_after` finished jobs). Returns an exit
    status: 0 after a clean stop, 1 when the board cannot start a node (the reason printed)."""
    from edge.core.mqtt_umqtt import UmqttMqtt
    from edge.core.outbox import Outbox
    from edge.core.session import Session

    def log(msg):
        if verbose:
            print(str(compat.time_ms()) + " " + msg)

    base = root()
    try:
        config = load_node(base + "/node.json")
        connect_wifi(load_wifi(base + "/wifi.json"))
        executor = make_executor(base + "/jobs")
        mqtt = UmqttMqtt(config["mqtt"]["url"], log=log)
    except (BoardError, OSError, ValueError) as e:
        say(str(e))
        return 1
    try:
        outbox = Outbox(base + "/outbox.log", max_bytes=OUTBOX_BYTES, log=log)
    except (OSError, ValueError) as e:
        say("cannot open " + base + "/outbox.log: " + str(e))
        executor.close()
        return 1
    session = Session(config, mqtt, executor, Offered(heap_mb()), log, outbox=outbox)
    return session.serve(say, exit_after)
