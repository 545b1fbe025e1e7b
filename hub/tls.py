"""The hub's TLS files: the operator's certificate, or a CA and a server certificate the hub
makes on first start and keeps in its data directory.

    <data dir>/tls/ca.pem      the CA nodes and clients pin (its sha256 travels with enrollment)
    <data dir>/tls/ca.key      its key, 0600: it signs the server certificate, nothing else
    <data dir>/tls/server.pem  the certificate HTTPS and MQTT over TLS present
    <data dir>/tls/server.key  its key, 0600

The CA is made once and kept: every node pinned it at enrollment, so a new one would cut them
all off. The server certificate is issued again at start when the names it must cover changed
(a new --host or --tls-name) or it is within RENEW_BEFORE_S of expiring; the CA stays.

A fingerprint is "sha256:" and the hex SHA-256 of a certificate's DER bytes, as nodes check it
(edge/enroll.py computes it the same way with the standard library alone).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# RSA rather than EC: the small TLS stacks of boards (axTLS, trimmed mbedTLS builds) all speak
# RSA. 2048 bits, as Let's Encrypt issues by default.
KEY_BITS = 2048
CA_DAYS = 20 * 365
SERVER_DAYS = 825  # the longest lifetime clients accept for a server certificate
RENEW_BEFORE_S = 30 * 86400
WILDCARDS = ("0.0.0.0", "::", "")


class TlsError(Exception):
    """A certificate or key that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class TlsFiles:
    """What the hub serves with. ca_pem is None when the operator gave the certificate; then
    fingerprint is the server certificate's own (the first one in their file)."""

    ca_pem: Path | None
    cert: Path
    key: Path
    fingerprint: str
    # Whether nodes should pin `fingerprint`: always for the hub's own CA; for an operator's
    # certificate only when it is self-signed (one from Let's Encrypt or another public CA is
    # trusted by the system already, and a pin on it would break at its next renewal).
    pinned: bool = True

    @property
    def pin_pem(self) -> bytes:
        """The PEM certificate whose fingerprint is `fingerprint`: what GET /api/v1/tls/ca
        serves."""
        return first_pem(self.ca_pem or self.cert)


def fingerprint(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def first_pem(path: Path) -> bytes:
    """The first certificate of a PEM file (a server certificate file often holds its chain)."""
    text = path.read_text()
    begin = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        raise TlsError(f"{path} holds no PEM certificate")
    return (text[begin : end + len("-----END CERTIFICATE-----")] + "\n").encode()


def server_names(host: str, extra: Iterable[str] = ()) -> list[str]:
    """The names the server certificate covers: loopback, the address the hub listens on (a
    wildcard is no name), this machine's name, and the operator's --tls-name."""
    names = ["localhost", "127.0.0.1", "::1"]
    if host not in WILDCARDS:
        names.append(host)
    hostname = socket.gethostname()
    if hostname:
        names.append(hostname)
    names += list(extra)
    return list(dict.fromkeys(_norm(n) for n in names if n.strip()))


def _norm(name: str) -> str:
    """One spelling per name: lower case, an IPv6 address without brackets, compressed."""
    name = name.strip().strip("[]").lower()
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def ensure_tls(
    data_dir: Path,
    cert: Path | None = None,
    key: Path | None = None,
    names: Iterable[str] = (),
) -> TlsFiles:
    """The files to serve with: the operator's cert and key, checked; or the hub's own CA and
    server certificate under data_dir/tls, made when missing. Raises TlsError."""
    if (cert is None) != (key is None):
        raise TlsError("give both --tls-cert and --tls-key, or neither (the hub makes its own)")
    if cert is not None and key is not None:
        return _operator_files(cert, key)
    wanted = [_norm(n) for n in names if n.strip()] or server_names("")
    return _own_files(data_dir / "tls", list(dict.fromkeys(wanted)))


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The HTTPS side: TLS 1.2 at least, the certificate (and its chain) with its key."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"cannot serve with {files.cert} and {files.key}: {e}") from None
    return ctx


# --- the operator's certificate --------------------------------------------------------
def _operator_files(cert: Path, key: Path) -> TlsFiles:
    try:
        leaf = x509.load_pem_x509_certificate(first_pem(cert))
    except OSError as e:
        raise TlsError(f"cannot read the certificate {cert}: {e.strerror or e}") from None
    except ValueError as e:
        raise TlsError(f"{cert} is not a PEM certificate: {e}") from None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as e:  # an OSError too: first
        raise TlsError(
            f"the key {key} does not belong to the certificate {cert}, or is no PEM key ({e})"
        ) from None
    except OSError as e:
        raise TlsError(f"cannot read the key {key}: {e.strerror or e}") from None
    if _expires(leaf) < _now():
        raise TlsError(f"the certificate {cert} expired on {_expires(leaf):%Y-%m-%d}: renew it")
    self_signed = leaf.issuer == leaf.subject
    return TlsFiles(
        ca_pem=None,
        cert=cert,
        key=key,
        fingerprint=fingerprint(leaf.public_bytes(serialization.Encoding.DER)),
        pinned=self_signed,
    )


# --- the hub's own CA ------------------------------------------------------------------
def _own_files(folder: Path, names: list[str]) -> TlsFiles:
    ca_pem, ca_key = folder / "ca.pem", folder / "ca.key"
    server_pem, server_key = folder / "server.pem", folder / "server.key"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if ca_pem.exists() and ca_key.exists():
            ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
            signer = _load_key(ca_key)
        else:
            ca, signer = _make_ca()
            _write(ca_key, _key_pem(signer), private=True)
            _write(ca_pem, ca.public_bytes(serialization.Encoding.PEM))
        if not _server_ok(server_pem, server_key, ca, names):
            leaf, leaf_key = _make_server(ca, signer, names)
            _write(server_key, _key_pem(leaf_key), private=True)
            _write(server_pem, leaf.public_bytes(serialization.Encoding.PEM))
    except OSError as e:
        raise TlsError(f"cannot keep the hub's TLS files in {folder}: {e.strerror or e}") from None
    except ValueError as e:
        raise TlsError(
            f"the hub's TLS files in {folder} are damaged ({e}); move the folder away to make "
            "new ones (nodes enrolled with the old CA must then enroll again)"
        ) from None
    return TlsFiles(
        ca_pem=ca_pem,
        cert=server_pem,
        key=server_key,
        fingerprint=fingerprint(ca.public_bytes(serialization.Encoding.DER)),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _expires(cert: x509.Certificate) -> datetime.datetime:
    return cert.not_valid_after_utc


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path} is not an RSA key")
    return key


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Through a temporary file renamed into place: a crash never leaves half a key."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _make_ca() -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DEparrow hub"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"DEparrow hub CA {socket.gethostname()} {os.urandom(4).hex()}"
            ),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _usage(ca: bool) -> x509.KeyUsage:
    """A CA signs certificates only; a server certificate signs and encrypts handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _make_server(
    ca: x509.Certificate, ca_key: rsa.RSAPrivateKey, names: list[str]
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _server_ok(pem: Path, key: Path, ca: x509.Certificate, names: list[str]) -> bool:
    """Whether the kept server certificate can serve on: signed by this CA, covering these
    names, with its key beside it, and not about to expire."""
    if not (pem.exists() and key.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(pem.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        cert.verify_directly_issued_by(ca)
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(pem, key)
    except (ValueError, TypeError, x509.ExtensionNotFound, ssl.SSLError, InvalidSignature):
        return False  # damaged, another CA's, or its key is not beside it: issue a new one
    covered = {_norm(str(n.value)) for n in san}
    fresh = (_expires(cert) - _now()).total_seconds() > RENEW_BEFORE_S
    return fresh and set(names) <= covered
