"""The earnings page of a MicroPython node, as a CGI program for BusyBox httpd.

CPython nodes serve theirs from edge-run (edge/dashboard.py). This one asks the hub for the
node's record (GET /api/v1/nodes/ID with the node's own credentials, as edge-run's page does)
and prints it as a small HTML page, or as JSON when QUERY_STRING is "json". Runs on MicroPython
(its `requests`) and on CPython (urllib), so it is tested on the host.
"""

import json
import os
import sys


def b64(data):
    try:
        import binascii

        return binascii.b2a_base64(data).strip().decode()
    except (ImportError, AttributeError):  # pragma: no cover
        import base64

        return base64.b64encode(data).decode()


def fetch(url, auth):
    headers = {"Authorization": "Basic " + auth, "Accept": "application/json"}
    try:
        import requests
    except ImportError:
        requests = None
    if requests is not None:
        resp = requests.get(url, headers=headers)
        try:
            return resp.status_code, resp.content
        finally:
            resp.close()
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def escape(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def page(node, error):
    rows = ""
    if node:
        for key, label in (
            ("name", "name"),
            ("id", "node"),
            ("state", "state"),
            ("earned", "credits earned"),
            ("uptime_s", "online (s)"),
        ):
            rows += "<tr><th>" + label + "</th><td>" + escape(node.get(key, "")) + "</td></tr>"
    body = "<p>" + escape(error) + "</p>" if error else "<table>" + rows + "</table>"
    return (
        "<!doctype html><meta charset=utf-8><title>DEparrow node</title>"
        "<h1>DEparrow node</h1>" + body
    )


def main():
    data_dir = os.getenv("DEPARROW_DATA_DIR") or "/var/lib/deparrow"
    node, error = None, ""
    try:
        with open(data_dir + "/node.json") as f:
            config = json.loads(f.read())
        node_id = config["node_id"]
        password = (config.get("mqtt") or {}).get("password") or ""
        url = config["hub"].rstrip("/") + "/api/v1/nodes/" + node_id
        status, text = fetch(url, b64((node_id + ":" + password).encode()))
        if status == 200:
            node = json.loads(text)
        else:
            error = "the hub answered " + str(status) + " for this node"
    except OSError as e:
        error = "not enrolled yet, or the hub is unreachable (" + repr(e) + ")"
    except (ValueError, KeyError) as e:
        error = "node.json is unreadable (" + repr(e) + ")"
    if os.getenv("QUERY_STRING") == "json":
        out = json.dumps({"node": node, "error": error or None})
        sys.stdout.write("Content-Type: application/json\r\n\r\n" + out)
    else:
        sys.stdout.write("Content-Type: text/html; charset=utf-8\r\n\r\n" + page(node, error))


main()
