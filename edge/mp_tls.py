"""TLS for a MicroPython node (edge/mp_main.py) and a hub started with --tls (docs/tls.md): the
hub's CA pinned at enrollment, the enrollment itself over HTTPS, and what umqtt.simple wraps
its socket with for mqtts://.

MicroPython's `requests` verifies nothing (it wraps with CERT_NONE), so enrollment speaks
HTTP/1.0 over the port's ssl module itself, verifying the hub against the CA. The CA comes
from --ca: the fingerprint `deparrow node token` prints (the hub's CA is fetched unverified
and kept only if it has that fingerprint, as edge/enroll.py does on CPython) or a PEM file.
MicroPython has no system CAs, so an https:// hub always needs one. Certificates are handed to
the port as DER: its mbedTLS may be built without PEM parsing (the unix port's is).

A feature of its own, so a board without TLS leaves it out: edge/mp_main.py imports it only
for an https:// hub or an mqtts:// broker. It runs on CPython too (the tests run both).
"""

import sys

from edge.core import compat

PIN = "sha256:"
PEM = ("-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----")


def _ssl():
    import ssl

    # umqtt.simple 1.3 (PyPI's, which tools/fetch-umqtt.py installs) imports its TLS module as
    # `ussl`, a name MicroPython 1.21 dropped; later ones import `ssl`. The same module.
    if "ussl" not in sys.modules:
        sys.modules["ussl"] = ssl
    return ssl


def pem_der(pem):
    """The DER bytes of the first certificate of a PEM text; ValueError when there is none."""
    begin = pem.find(PEM[0])
    end = pem.find(PEM[1], begin)
    if begin < 0 or end < 0:
        raise ValueError("no PEM certificate")
    return compat.b64decode("".join(pem[begin + len(PEM[0]) : end].split()))


def fingerprint(der):
    """sha256: and the hex SHA-256 of a certificate's DER bytes, as hub/tls.py makes it."""
    return PIN + compat.hexlify(compat.sha256(der).digest())


def read_ca(path):
    """The DER of the CA in the PEM file at path; ValueError naming the file."""
    try:
        with open(path) as f:
            return pem_der(f.read())
    except OSError as e:
        raise ValueError("cannot read the CA file " + path + ": " + repr(e)) from None
    except ValueError:
        raise ValueError("the CA file " + path + " holds no PEM certificate") from None


def mqtt_ssl_params(ca_path):
    """umqtt.simple's ssl_params for mqtts:// (the arguments of the port's ssl.wrap_socket):
    verify the broker against the CA in ca_path; edge/core/mqtt_umqtt.py adds its host name."""
    return {"cert_reqs": _ssl().CERT_REQUIRED, "cadata": read_ca(ca_path)}


def https(url, cadata, body=None):
    """(status, body) of a GET, or a POST of the JSON bytes body, to an https:// hub, verified
    against cadata (the CA's DER; None: not verified, only to fetch the CA a pin is then
    checked against). ValueError when the hub's certificate is not trusted, OSError when the
    hub cannot be reached."""
    import socket

    ssl = _ssl()
    netloc, _, path = url.partition("://")[2].partition("/")
    host, _, port = netloc.rpartition(":")
    host, port = (host, int(port)) if port.isdigit() and host else (netloc, 443)
    host = host.strip("[]")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cadata is None and hasattr(ctx, "check_hostname"):  # CPython checks names by default
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE if cadata is None else ssl.CERT_REQUIRED
    if cadata is not None:
        ctx.load_verify_locations(cadata=cadata)
    ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    s = socket.socket(ai[0], socket.SOCK_STREAM, ai[2])
    try:
        s.settimeout(15)
        s.connect(ai[-1])
        try:
            s = ctx.wrap_socket(s, server_hostname=host)
        except ValueError as e:  # mbedTLS's words; CPython's SSLCertVerificationError is one
            raise ValueError(
                "the hub at " + url.partition("/api/")[0] + " presents a certificate this "
                "node does not trust (" + str(e).strip() + "): check --ca"
            ) from None  # fmt: skip
        head = ("POST /" if body else "GET /") + path + " HTTP/1.0\r\nHost: " + host
        if body:
            head += "\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body))
        s.write((head + "\r\n\r\n").encode() + (body or b""))
        answer = _read_answer(s)
    finally:
        s.close()
    status, _, rest = answer.partition(b"\r\n")
    return int(status.split()[1]), rest.partition(b"\r\n\r\n")[2]


def _read_answer(s):
    """The whole HTTP answer: up to Content-Length, else to the end of the stream. (The hub
    closes the connection after an HTTP/1.0 answer, but only once the client answers its TLS
    close_notify, which MicroPython's TLS does not do: waiting for the end would time out.)"""
    data = b""
    while True:
        end = data.find(b"\r\n\r\n")
        if end >= 0 and len(data) >= end + 4 + _content_length(data[:end]):
            return data
        chunk = s.read(2048)
        if not chunk:
            return data
        data += chunk


def pin_ca(hub, ca, dest):
    """Keep the CA the node trusts the hub with as dest: the hub's own, if its fingerprint is
    the pin ca ("sha256:..."), or the PEM file ca. Returns its DER; ValueError says what is
    wrong, and then nothing is kept."""
    if not hub.startswith("https://"):
        raise ValueError("--ca is the CA of an https:// hub; " + hub + " is not one")
    if ca.startswith(PIN):
        status, pem = https(hub.rstrip("/") + "/api/v1/tls/ca", None)
        if status != 200:
            raise ValueError(
                "the hub at " + hub + " does not hand out its CA (" + str(status) + "): is "
                "it started with --tls?"
            )  # fmt: skip
        pem = pem.decode()
        der = pem_der(pem)
        got, want = fingerprint(der), PIN + ca[len(PIN) :].replace(":", "").lower()
        if got != want:
            raise ValueError(
                "the hub at " + hub + " presents a CA with fingerprint " + got + ", not "
                + want + " as --ca says: refusing to trust it, nothing was sent to it"
            )  # fmt: skip
    else:
        der = read_ca(ca)
        with open(ca) as f:
            pem = f.read()
    with open(dest, "w") as f:
        f.write(pem)
    return der


def _content_length(head):
    """The Content-Length of an answer's head; a length never reached when it has none."""
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(value.strip())
    return 1 << 62
