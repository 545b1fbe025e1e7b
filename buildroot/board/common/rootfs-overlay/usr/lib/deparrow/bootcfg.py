"""Reads the files a DEparrow image is provisioned with, for the shell scripts that boot it.

    python3|micropython bootcfg.py node FILE      check a node identity (node.json)
    python3|micropython bootcfg.py enroll FILE    print HUB='..' TOKEN='..' NAME='..' (enroll.json)
    python3|micropython bootcfg.py wpa FILE OUT   write a wpa_supplicant config from wifi.json
    python3|micropython bootcfg.py get FILE KEY   print one string value (node_id, hub...)

Runs on CPython and on the MicroPython unix port (json and sys only), so every image has it.
Exit 0 on success; otherwise one line on stderr that names the file and what is wrong, exit 1.
The printed assignments are single-quoted for `eval` in sh.
"""

import json
import sys


class Bad(Exception):
    pass


def load(path):
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        raise Bad("cannot read " + path) from None
    try:
        data = json.loads(text)
    except ValueError:
        raise Bad(path + " is not valid JSON") from None
    if not isinstance(data, dict):
        raise Bad(path + " must hold a JSON object")
    return data


def text(data, path, key, required=True):
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value:
        raise Bad(path + ": " + repr(key) + " must be a non-empty string")
    for c in value:
        if ord(c) < 32 or c == "\x7f":
            raise Bad(path + ": " + repr(key) + " contains a control character")
    return value


def quote(value):
    return "'" + value.replace("'", "'\\''") + "'"


def check_hub(path, hub):
    if not (hub.startswith("http://") or hub.startswith("https://")):
        raise Bad(path + ": hub must be an http:// or https:// URL, not " + repr(hub))
    return hub


def cmd_node(path):
    data = load(path)
    for key in ("node_id", "node_secret"):
        text(data, path, key)
    check_hub(path, text(data, path, "hub"))
    mqtt = data.get("mqtt")
    if not isinstance(mqtt, dict) or not isinstance(mqtt.get("url"), str):
        raise Bad(path + ": mqtt.url is missing (write it again with 'deparrow board provision')")


def cmd_enroll(path):
    data = load(path)
    hub = check_hub(path, text(data, path, "hub"))
    token = text(data, path, "token")
    if not token.startswith("dpe_"):
        raise Bad(path + ": token must be an enrollment token (dpe_...) from 'deparrow node token'")
    print("HUB=" + quote(hub))
    print("TOKEN=" + quote(token))
    print("NAME=" + quote(text(data, path, "name", required=False)))


def cmd_wpa(path, out):
    data = load(path)
    ssid = text(data, path, "ssid")
    psk = text(data, path, "psk", required=False)
    if '"' in ssid or '"' in psk:
        raise Bad(path + ": ssid and psk cannot contain a double quote")
    if len(ssid) > 32:
        raise Bad(path + ": ssid is longer than 32 bytes")
    if psk and not 8 <= len(psk) <= 63:
        raise Bad(path + ": psk must be 8 to 63 characters (or absent for an open network)")
    lines = [
        "ctrl_interface=/run/wpa_supplicant",
        "update_config=0",
        "network={",
        '\tssid="' + ssid + '"',
        "\tscan_ssid=1",
    ]
    lines.append('\tpsk="' + psk + '"' if psk else "\tkey_mgmt=NONE")
    lines.append("}")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")


def cmd_get(path, key):
    print(text(load(path), path, key))


def main(argv):
    commands = {
        "node": (cmd_node, 1),
        "enroll": (cmd_enroll, 1),
        "wpa": (cmd_wpa, 2),
        "get": (cmd_get, 2),
    }
    if len(argv) < 2 or argv[1] not in commands or len(argv) != 2 + commands[argv[1]][1]:
        sys.stderr.write("usage: bootcfg.py node|enroll FILE | wpa FILE OUT | get FILE KEY\n")
        return 2
    fn, _ = commands[argv[1]]
    try:
        fn(*argv[2:])
    except Bad as e:
        sys.stderr.write("deparrow: " + str(e) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
