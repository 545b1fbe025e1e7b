"""Fetching a job's input file from an `https://` URL on the open internet, safely.

The hub runs next to things a stranger must not reach through it: its own admin port, the
cloud's metadata service at 169.254.169.254, the operator's private network. So every address
the hub connects to is checked to be public, and the check sits where the connection is made: a
resolver that refuses a host name when any address it resolves to is not public, so a name that
resolves to a public address when checked and to 127.0.0.1 when connected (DNS rebinding) cannot
slip through, and every redirect hop passes the same gate. aiohttp never asks a resolver about an
IP literal, so those are checked on the URL before each request.

Redirects are followed by hand, to check each hop's scheme and address before connecting, and
the body is read in chunks and dropped once it passes the cap.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import ipaddress
import socket
import ssl
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_CHARS = 2048
CHUNK_BYTES = 64 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
PUBLIC_ONLY = "(the hub fetches public addresses only)"

# Ranges `is_global` lets through on some Python versions, or that stand for another address.
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # carries an IPv4 address in its last 32 bits
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # local-use NAT64 (RFC 8215)
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d


def _version() -> str:
    try:
        return importlib.metadata.version("deparrow")
    except importlib.metadata.PackageNotFoundError:
        return "0"


USER_AGENT = f"deparrow-hub/{_version()}"


class FetchError(Exception):
    """An input could not be fetched; the message names the URL and the problem."""

    def __init__(self, url: str, problem: str) -> None:
        shown = url if len(url) <= 200 else url[:100] + "…"
        super().__init__(f"{shown}: {problem}")
        self.url = url
        self.problem = problem


def non_public_reason(address: IPAddress) -> str | None:
    """Why the hub must not connect to `address`, in a word or two ("loopback", "private"), or
    None when it is a public address. An IPv6 address that stands for an IPv4 one
    (::ffff:a.b.c.d, 6to4, NAT64) is judged by the IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return non_public_reason(embedded)
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local"
    if address in _SHARED:
        return "in the carrier-grade NAT range 100.64.0.0/10"
    if address.is_reserved or address in _IPV4_COMPATIBLE:
        return "reserved"
    if address.is_private:
        return "private"
    if address in _NAT64_LOCAL or not address.is_global:
        return "not globally routable"
    return None


def is_public_address(address: str | IPAddress) -> bool:
    """Whether the hub may connect to `address` (an IP address, not a host name)."""
    try:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    except ValueError:
        return False
    return non_public_reason(ip) is None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _address_problem(address: str) -> str | None:
    """What is wrong with connecting to `address` ("is private", "stands for 127.0.0.1, which is
    loopback"), or None when nothing is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "is not an IP address the hub can check"
    reason = non_public_reason(ip)
    if reason is None:
        return None
    embedded = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    if embedded is not None:
        return f"stands for {embedded}, which is {reason}"
    return f"is {reason}"


def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


class _AddressRefused(OSError):
    """Raised by the resolver; aiohttp hands it back inside a ClientConnectorDNSError."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class PublicOnlyResolver(AbstractResolver):
    """aiohttp's resolver, refusing a host name when any address it resolves to is not public,
    so that the connection goes only to addresses that were checked."""

    def __init__(self) -> None:
        self._inner: AbstractResolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            problem = _address_problem(result["host"])
            if problem is not None:
                raise _AddressRefused(
                    f"the host name {host} resolves to {result['host']}, which {problem} "
                    + PUBLIC_ONLY
                )
        return results

    async def close(self) -> None:
        await self._inner.close()


class _BadURL(Exception):
    """What is wrong with a URL, for FetchError's message."""


def _check_url(url: str, allow_private: bool) -> URL:
    """The URL to request, or _BadURL saying why it is refused."""
    if len(url) > MAX_URL_CHARS:
        raise _BadURL(f"the URL is longer than {MAX_URL_CHARS} characters")
    if any(ord(c) <= 32 or ord(c) == 127 for c in url):
        raise _BadURL("the URL contains spaces or control characters")
    try:
        parsed = URL(url)
        port = parsed.explicit_port
        netloc = urlsplit(url).netloc
    except ValueError as exc:
        raise _BadURL(f"not a valid URL ({exc})") from None
    scheme = parsed.scheme.lower()
    allowed = ("https", "http") if allow_private else ("https",)
    if scheme not in allowed:
        if not scheme:
            raise _BadURL("not an absolute URL (the hub fetches https:// URLs only)")
        if scheme == "http":
            raise _BadURL("plain http:// is refused (the hub fetches https:// URLs only)")
        raise _BadURL(f"{scheme}:// is not supported (the hub fetches https:// URLs only)")
    if "@" in netloc or parsed.raw_user is not None or parsed.raw_password is not None:
        raise _BadURL("a user name or password in the URL is refused (the hub sends none)")
    host = parsed.host
    if not host:
        raise _BadURL("the URL names no host")
    if port is not None and not 1 <= port <= 65535:
        raise _BadURL(f"the port {port} is not a valid port")
    literal = _ip_literal(host)
    if literal is not None and not allow_private:
        problem = _address_problem(literal)
        if problem is not None:
            raise _BadURL(f"the address {host} {problem} {PUBLIC_ONLY}")
    return parsed.with_fragment(None)


async def fetch(
    url: str,
    *,
    max_bytes: int,
    allow_private: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    timeout_s: float = 30.0,
    max_redirects: int = 5,
) -> bytes:
    """The body of `url`, at most `max_bytes` long, fetched from public addresses only (any
    address when `allow_private`, which also allows http://). Raises FetchError, and nothing
    else, when the URL, an address, a redirect, the status, the size or the connection is wrong,
    or when it all takes longer than `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _fetch(
                url, max_bytes, allow_private, ssl_context, timeout_s, max_redirects
            )
    except FetchError:
        raise
    except TimeoutError:
        raise FetchError(url, f"no complete answer within {timeout_s:g} seconds") from None
    except Exception as exc:  # a bug here must still reach the user as a FetchError
        raise FetchError(
            url, f"the fetch failed unexpectedly ({type(exc).__name__}: {exc})"
        ) from exc


async def _fetch(
    url: str,
    max_bytes: int,
    allow_private: bool,
    ssl_context: ssl.SSLContext | None,
    timeout_s: float,
    max_redirects: int,
) -> bytes:
    resolver: AbstractResolver = DefaultResolver() if allow_private else PublicOnlyResolver()
    connector = aiohttp.TCPConnector(
        resolver=resolver, ssl=ssl_context if ssl_context is not None else True
    )
    headers = {"User-Agent": USER_AGENT, "Accept": "*/*", "Accept-Encoding": "identity"}
    try:
        async with aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            auto_decompress=False,
            trust_env=False,
        ) as session:
            target = url
            redirects = 0
            while True:
                hop = "" if target == url else f"redirected to {target}: "
                try:
                    checked = _check_url(target, allow_private)
                except _BadURL as exc:
                    raise FetchError(url, hop + str(exc)) from None
                try:
                    async with session.get(checked, allow_redirects=False) as response:
                        if response.status in REDIRECT_STATUSES:
                            redirects += 1
                            target = _next_hop(url, hop, response, redirects, max_redirects)
                            continue
                        return await _read_body(url, hop, response, max_bytes)
                except TimeoutError:
                    raise  # aiohttp's timeouts are ClientErrors too: fetch() words them
                except aiohttp.ClientError as exc:
                    raise FetchError(url, hop + _connection_problem(exc)) from None
    finally:
        await resolver.close()


def _next_hop(
    url: str, hop: str, response: aiohttp.ClientResponse, redirects: int, max_redirects: int
) -> str:
    if redirects > max_redirects:
        raise FetchError(url, f"more than {max_redirects} redirects")
    location = response.headers.get("Location")
    if not location:
        raise FetchError(
            url, hop + f"the server answered {response.status} {response.reason} with no Location"
        )
    try:
        return str(response.url.join(URL(location)))
    except ValueError:
        raise FetchError(url, hop + f"the redirect to {location!r} is not a valid URL") from None


async def _read_body(url: str, hop: str, response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    if not 200 <= response.status < 300:
        raise FetchError(url, hop + f"the server answered {response.status} {response.reason}")
    too_large = f"larger than the hub's {max_bytes}-byte limit for an input"
    if response.content_length is not None and response.content_length > max_bytes:
        raise FetchError(url, hop + f"the file is {response.content_length} bytes, {too_large}")
    body = bytearray()
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        body += chunk
        if len(body) > max_bytes:
            raise FetchError(url, hop + f"the file is {too_large} (stopped reading there)")
    return bytes(body)


def _connection_problem(exc: aiohttp.ClientError) -> str:
    """A ClientError in a few plain words."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        if isinstance(exc.os_error, _AddressRefused):
            return exc.os_error.problem
        return f"the host name {exc.host} could not be resolved ({_os_error(exc.os_error)})"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        error = exc.certificate_error
        detail = getattr(error, "verify_message", None) or str(error)
        return f"the server's TLS certificate was refused (certificate verify failed: {detail})"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"the TLS handshake with {exc.host} failed ({_os_error(exc.os_error)})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"could not connect to {exc.host} port {exc.port} ({_os_error(exc.os_error)})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection before answering in full"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer's body was cut short or malformed"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"the server's answer was not valid HTTP ({exc.message})"
    return f"the request failed ({type(exc).__name__}: {exc})"


def _os_error(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__
