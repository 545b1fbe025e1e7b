"""A DEparrow node on MicroPython (the unix port, or a board with a filesystem and os.system):

    micropython edge/mp_main.py --data-dir DIR [--hub URL --token TOKEN] [options]

It runs the same edge core as `edge-run` (edge/core/: session.py, jobs.py, protocol.py) with
MicroPython's adapters: umqtt.simple for MQTT (edge/core/mqtt_umqtt.py; tools/fetch-umqtt.py
installs it in edge/native/lib) and, for jobs, the firmware's dpwasm3 module in this process
(firmware/wasm3_exec.py) where the MicroPython was built with it (firmware/build.sh --unix,
whose binary has this node frozen in: `micropython -m edge.mp_main ...`), else a wasm3-run
process per job (edge/executors/wasm3_cli.py; tools/build-wasm3-runner.sh builds it), as also
with --runner. Its identity is DIR/node.json, the file `edge-run`
writes at enrollment, so a node enrolled by `edge-run --data-dir DIR` runs here unchanged;
given --hub and --token instead, it enrolls itself (with MicroPython's `requests`).
The same file runs on CPython too (paho-mqtt then stands in for umqtt). See
docs/edge-micropython.md.

A hub with --tls (docs/tls.md): --ca takes the fingerprint `deparrow node token` prints, or
the CA's PEM file; it is kept as DIR/ca.pem and node.json names it. Enrollment verifies the hub
against it and mqtts:// the broker (edge/mp_tls.py, loaded only then).
"""

import sys

try:
    import os
except ImportError:  # pragma: no cover
    import uos as os  # type: ignore[no-redef]


def _root():
    here = __file__ if __file__.startswith("/") else os.getcwd() + "/" + __file__
    return here[: here.rfind("/edge/")] if "/edge/" in here else "."


ROOT = _root()
# Run as a script, this file's own directory comes first on the path: edge/ is a package,
# not a place to import from. The repository root and the MicroPython libraries go there.
# Imported (`micropython -m edge.mp_main`, frozen into the firmware or not) the path is left
# as it is: the edge package was found already.
if ROOT + "/edge" in sys.path:
    while ROOT + "/edge" in sys.path:
        sys.path.remove(ROOT + "/edge")
    for _p in (ROOT + "/edge/native/lib", ROOT):
        if _p not in sys.path:
            sys.path.insert(0, _p)

from edge.core import compat  # noqa: E402 - after the path is set
from edge.core.outbox import Outbox  # noqa: E402
from edge.core.session import Session  # noqa: E402

USAGE = """usage: micropython edge/mp_main.py --data-dir DIR [--hub URL --token TOKEN] [options]
  --data-dir DIR      the node's identity (DIR/node.json) and job files (DIR/jobs)
  --hub URL           enroll with this hub when DIR/node.json does not exist yet
  --token TOKEN       the enrollment token (from 'deparrow node token')
  --ca sha256:HEX|FILE  an https:// hub's CA: the fingerprint 'deparrow node token' prints,
                      or a PEM file (kept as DIR/ca.pem); default: node.json's "ca",
                      else DIR/ca.pem
  --name NAME         the node's name on the hub (default: mp-node)
  --cpu N             CPU-equivalents to offer (default 1)
  --memory-mb N       RAM to offer, MiB (default: MemAvailable from /proc/meminfo, else 64)
  --runner PATH       run jobs in this wasm3-run program, not in the firmware's dpwasm3
                      (default where there is no dpwasm3: edge/native/bin/wasm3-run)
  --stdout-cap BYTES  keep at most this much of a job's stdout (default 65536)
  --files-max-bytes N file jobs: at most N bytes of inputs and N of outputs (default 65536;
                      0: no file jobs here)
  --exit-after N      stop after N jobs have finished (for tests and measurements)
  -v                  log every job and connection event"""


class UsageError(Exception):
    pass


def parse_args(argv):
    opts = {"name": "mp-node", "cpu": 1.0, "stdout_cap": 65536, "verbose": False,
            "files_max_bytes": 65536}  # fmt: skip
    numbers = {"--cpu": float, "--memory-mb": int, "--stdout-cap": int, "--exit-after": int,
               "--files-max-bytes": int}  # fmt: skip
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            raise UsageError("")
        if a == "-v":
            opts["verbose"] = True
            i += 1
            continue
        if a not in ("--data-dir", "--hub", "--token", "--ca", "--name", "--runner") and (
            a not in numbers
        ):
            raise UsageError("unknown option " + a)
        if i + 1 >= len(argv):
            raise UsageError(a + " needs a value")
        value = argv[i + 1]
        key = a[2:].replace("-", "_")
        if a in numbers:
            try:
                value = numbers[a](value)
            except ValueError:
                raise UsageError(a + " takes a number, not " + repr(value)) from None
            if value < 0 or (a not in ("--exit-after", "--files-max-bytes") and value == 0):
                raise UsageError(a + " must be more than 0")
        opts[key] = value
        i += 2
    if "data_dir" not in opts:
        raise UsageError("--data-dir is required")
    return opts


def _read(path):
    with open(path) as f:
        return f.read()


def memory_available_mb():
    try:
        for line in _read("/proc/meminfo").split("\n"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 64


def load_config(path):
    """node.json as edge-run writes it; a ValueError names what is wrong."""
    try:
        text = _read(path)
    except OSError:
        return None
    try:
        config = compat.json_loads(text)
    except ValueError as e:
        raise ValueError(
            path + " is not valid JSON (" + str(e) + "); remove it to re-enroll"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(path + " is not a JSON object; remove it to re-enroll")
    for key in ("node_id", "node_secret", "mqtt"):
        if key not in config:
            raise ValueError(path + " lacks " + repr(key) + "; remove it to re-enroll")
    mqtt = config["mqtt"]
    if not isinstance(mqtt, dict) or not isinstance(mqtt.get("url"), str):
        raise ValueError(path + ": mqtt.url is missing; remove it to re-enroll")
    if not isinstance(config["node_id"], str) or not isinstance(config["node_secret"], str):
        raise ValueError(path + ": node_id and node_secret must be strings")
    return config


def _post_json(url, body, cadata=None):
    data = compat.json_dumps(body)
    if url.startswith("https://"):
        if cadata is None:
            raise ValueError(
                "an https:// hub needs --ca: the sha256: fingerprint 'deparrow node token' "
                "prints, or the hub's CA file (a MicroPython node has no system CAs)"
            )
        from edge.mp_tls import https

        return _answer(*https(url, cadata, data))
    try:
        import requests  # MicroPython's (frozen in the unix port; `mip install requests`)
    except ImportError:
        requests = None
    if requests is not None:
        resp = requests.post(url, data=data, headers={"Content-Type": "application/json"})
        try:
            status, text = resp.status_code, resp.content
        finally:
            resp.close()
    else:  # CPython without requests
        import urllib.error
        import urllib.request

        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                status, text = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
    return _answer(status, text)


def _answer(status, text):
    try:
        answer = compat.json_loads(text)
    except ValueError:
        answer = {}
    if not 200 <= status < 300:
        raise ValueError(
            "the hub refused enrollment (" + str(status) + "): " + str(answer.get("error") or text)
        )
    return answer


def enroll(hub, token, name, cpu, memory_mb, path, ca=None):
    """Enroll and write node.json at path; ca (an https:// hub): a pin or a PEM file, kept as
    ca.pem beside node.json, which names it."""
    try:
        arch = _read("/proc/sys/kernel/arch").strip()
    except OSError:
        arch = ""
    ca_path = cadata = None
    try:
        if ca is not None:
            from edge.mp_tls import pin_ca

            ca_path = path[: path.rfind("/") + 1] + "ca.pem"
            cadata = pin_ca(hub, ca, ca_path)
        answer = _post_json(
            hub.rstrip("/") + "/api/v1/nodes/enroll",
            {"token": token, "name": name, "engines": ["wasm"], "arch": arch, "cpu": cpu,
             "memory_mb": memory_mb},
            cadata,
        )  # fmt: skip
    except OSError as e:
        raise ValueError("cannot reach the hub at " + hub + ": " + repr(e)) from None
    config = {
        "hub": hub,
        "node_id": answer["node_id"],
        "node_secret": answer["node_secret"],
        "owner": answer["owner"],
        "mqtt": answer["mqtt"],
        "heartbeat_interval_s": answer["heartbeat_interval_s"],
    }
    if ca_path is not None:
        config["ca"] = ca_path
    tmp = path + ".tmp"
    os.system("umask 077 && : > '" + tmp.replace("'", "'\"'\"'") + "'")  # the secret is 0600
    with open(tmp, "w") as f:
        f.write(compat.json_dumps(config).decode())
    os.rename(tmp, path)  # a crash mid-write never leaves half a config
    return config


class Offered:
    """What this node offers in heartbeats: fixed CPU, the RAM the kernel says is available."""

    def __init__(self, cpu, memory_mb=None):
        self.cpu = cpu
        self.memory_mb = memory_mb

    def __call__(self, busy):
        mem = self.memory_mb or memory_available_mb()
        try:
            load = float(_read("/proc/loadavg").split()[0]) / max(1.0, self.cpu)
        except (OSError, ValueError, IndexError):
            load = 0.0
        return {"cpu": self.cpu, "memory_mb": mem, "gpu": 0, "load": min(1.0, round(load, 3))}


# wasm3-run's limits, which the in-process engine is given too: the same outcomes either way.
STDERR_CAP = 64 << 10
MEMORY_MB_DEFAULT = 64


def make_executor(opts, data_dir):
    """The firmware's dpwasm3 (jobs in this process, on a thread of their own), unless
    --runner names a wasm3-run or this MicroPython has no dpwasm3; then wasm3-run, a process
    per job, which also gives jobs files (dpwasm3 has none: a board has no directories)."""
    if not opts.get("runner"):
        try:
            from wasm3_exec import Wasm3ModuleExecutor  # ImportError without dpwasm3
        except ImportError:
            Wasm3ModuleExecutor = None
        if Wasm3ModuleExecutor is not None:
            executor = Wasm3ModuleExecutor(
                memory_mb_default=MEMORY_MB_DEFAULT, stdout_cap=opts["stdout_cap"],
                stderr_cap=STDERR_CAP,
            )  # fmt: skip
            return executor, "dpwasm3, in this process"
    from edge.executors.wasm3_cli import Wasm3CliExecutor

    executor = Wasm3CliExecutor(
        data_dir + "/jobs", runner=opts.get("runner"), stdout_cap=opts["stdout_cap"],
        stderr_cap=STDERR_CAP, memory_mb_default=MEMORY_MB_DEFAULT,
    )  # fmt: skip
    return executor, executor.runner


def node_ca(opts, config, data_dir):
    """The CA file the hub and its broker are verified with: --ca FILE, node.json's "ca", or
    DIR/ca.pem; None when there is none."""
    ca = opts.get("ca")
    if ca and not ca.startswith("sha256:"):  # a pin was for enrollment: ca.pem is its CA
        return ca
    if isinstance(config.get("ca"), str):
        return config["ca"]
    return data_dir + "/ca.pem" if compat.path_exists(data_dir + "/ca.pem") else None


def make_mqtt(url, log, ca=None):
    try:
        from edge.core.mqtt_umqtt import UmqttMqtt, is_tls
    except ImportError:  # CPython: umqtt.simple needs MicroPython's u-modules
        from edge.mqtt_paho import PahoMqtt

        return PahoMqtt(url, ca_certs=ca)
    params = None
    if is_tls(url) and ca is not None:  # without a CA, UmqttMqtt says what is missing
        from edge.mp_tls import mqtt_ssl_params

        params = mqtt_ssl_params(ca)
    return UmqttMqtt(url, log=log, ssl_params=params)


def main(argv):
    try:
        opts = parse_args(argv)
    except UsageError as e:
        print(("mp_main: " + str(e) + "\n" if str(e) else "") + USAGE)
        return 2 if str(e) else 0
    verbose = opts["verbose"]

    def log(msg):
        if verbose:
            print(str(compat.time_ms()) + " " + msg)

    data_dir = opts["data_dir"].rstrip("/") or "/"
    path = data_dir + "/node.json"
    try:
        if not compat.path_exists(data_dir):
            os.mkdir(data_dir)
        config = load_config(path)
        if config is None:
            if not opts.get("hub") or not opts.get("token"):
                raise ValueError(
                    "this node is not enrolled yet: pass --hub URL --token TOKEN "
                    "(create a token on the hub with 'deparrow node token')"
                )
            mem = opts.get("memory_mb") or memory_available_mb()
            config = enroll(
                opts["hub"], opts["token"], opts["name"], opts["cpu"], mem, path, opts.get("ca")
            )
            print("mp_main: enrolled as " + config["node_id"] + " (identity in " + path + ")")
        mqtt = make_mqtt(config["mqtt"]["url"], log, node_ca(opts, config, data_dir))
        executor, engine = make_executor(opts, data_dir)
    except (ValueError, OSError) as e:  # RunnerMissing is an OSError
        print("mp_main: " + str(e))
        return 1
    # results and events wait in a file while the broker is away, as with edge-run
    try:
        outbox = Outbox(data_dir + "/outbox.log", log=log)
    except (OSError, ValueError) as e:
        print("mp_main: cannot open " + data_dir + "/outbox.log: " + str(e))
        executor.close()
        return 1
    offered = Offered(opts["cpu"], opts.get("memory_mb"))
    if opts.get("files_max_bytes"):  # small file jobs, in the board's own directory
        cap = opts["files_max_bytes"]
        config["files"] = {"dir": data_dir + "/jobfiles", "max_input_bytes": cap,
                           "max_output_bytes": cap, "max_output_files": 16}  # fmt: skip
    session = Session(config, mqtt, executor, offered, log, outbox=outbox)
    print("mp_main: wasm jobs run in " + engine)
    return session.serve(lambda text: print("mp_main: " + text), opts.get("exit_after"), 0.002)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
