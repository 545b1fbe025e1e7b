"""hub.api.fetch against a real HTTPS server on a loopback port, with a real certificate from a
throwaway CA (trustme): public addresses only, the size cap, redirects, statuses, TLS, timeouts
and URLs refused before any connection."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trustme
from aiohttp import web
from yarl import URL

from hub.api import fetch as fetch_module
from hub.api.fetch import (
    FetchError,
    PublicOnlyResolver,
    fetch,
    is_public_address,
    non_public_reason,
)

PAYLOAD = bytes(range(256)) * 4  # 1024 bytes
PUBLIC_ONLY = "(the hub fetches public addresses only)"


class Server:
    """A test server and what it was asked: the path and headers of each request."""

    def __init__(self, base: URL) -> None:
        self.base = base
        self.hits: list[str] = []
        self.headers: list[dict[str, str]] = []

    def url(self, path: str, **query: str) -> str:
        return str(self.base.join(URL(path)).with_query(query or None))


def make_app(server_box: list[Server]) -> web.Application:
    stall = asyncio.Event()  # never set: a server that does not answer

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        server_box[0].hits.append(request.path)
        server_box[0].headers.append(dict(request.headers))
        response: web.StreamResponse = await handler(request)
        return response

    async def file(request: web.Request) -> web.Response:
        return web.Response(body=PAYLOAD)

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 2048)

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            while True:
                await response.write(b"y" * 1024)
        except ConnectionError:
            return response

    async def hops(request: web.Request) -> web.Response:
        left = int(request.match_info["n"])
        if left == 0:
            return web.Response(body=PAYLOAD)
        raise web.HTTPFound(f"/hops/{left - 1}")  # relative, as servers often send them

    async def to(request: web.Request) -> web.Response:
        response = web.HTTPFound(request.query["url"])
        response.set_cookie("session", "secret")
        raise response

    async def stalls(request: web.Request) -> web.Response:
        await stall.wait()
        return web.Response(body=PAYLOAD)

    app = web.Application(middlewares=[record])
    app.router.add_get("/file", file)
    app.router.add_get("/big", big)
    app.router.add_get("/endless", endless)
    app.router.add_get("/hops/{n}", hops)
    app.router.add_get("/to", to)
    app.router.add_get("/stall", stalls)
    return app


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def trust(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts the test CA (and nothing else)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the name and the chain
    ca.configure_trust(context)
    return context


ServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
def start(aiohttp_server: Any, ca: trustme.CA) -> ServerFactory:
    async def go(*, tls: bool = True) -> Server:
        box: list[Server] = []
        kwargs: dict[str, Any] = {}
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
            kwargs["ssl"] = context
        test_server = await aiohttp_server(make_app(box), **kwargs)
        box.append(Server(test_server.make_url("/")))
        return box[0]

    return go


@pytest.fixture
async def server(start: ServerFactory) -> Server:
    return await start()


async def refused(url: str, **kwargs: Any) -> str:
    kwargs.setdefault("max_bytes", 1024)
    with pytest.raises(FetchError) as caught:
        await fetch(url, **kwargs)
    message = str(caught.value)
    assert message.startswith(url + ": " if len(url) <= 200 else url[:100] + "…: ")
    assert len(message) < 400
    return caught.value.problem


@pytest.fixture
def loopback_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count the test server's 127.0.0.1 as public, to test what is refused after it."""
    judge = non_public_reason

    def lenient(address: Any) -> str | None:
        return None if str(address) == "127.0.0.1" else judge(address)

    monkeypatch.setattr(fetch_module, "non_public_reason", lenient)


# --- which addresses are public ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.1.2.3", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.5", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "in the carrier-grade NAT range 100.64.0.0/10"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("64:ff9b::a00:5", "private"),  # NAT64 of 10.0.0.5
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("fec0::1", "site-local"),
        ("240.0.0.1", "reserved"),
        ("::7f00:1", "reserved"),
        ("255.255.255.255", None),
        ("192.0.2.1", None),
        ("198.18.0.1", None),
        ("2001:db8::1", None),
    ],
)
def test_non_public_addresses_are_named(address: str, reason: str | None) -> None:
    ip = ipaddress.ip_address(address)
    assert not is_public_address(address)
    if reason is not None:
        assert non_public_reason(ip) == reason
    else:
        assert non_public_reason(ip) is not None


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::"]
)
def test_public_addresses_pass(address: str) -> None:
    assert is_public_address(address)
    assert non_public_reason(ipaddress.ip_address(address)) is None


def test_a_host_name_is_not_an_address() -> None:
    assert not is_public_address("example.com")


async def test_the_resolver_refuses_a_name_for_a_loopback_address() -> None:
    resolver = PublicOnlyResolver()
    try:
        with pytest.raises(OSError, match=r"the host name localhost resolves to .*loopback"):
            await resolver.resolve("localhost", 443)
    finally:
        await resolver.close()


# --- refused before any request ------------------------------------------------------------------


async def test_a_loopback_address_is_refused_without_a_request(server: Server) -> None:
    url = server.url("/file")
    problem = await refused(url)
    assert problem == f"the address 127.0.0.1 is loopback {PUBLIC_ONLY}"
    assert server.hits == []


async def test_a_name_resolving_to_loopback_is_refused_without_a_request(server: Server) -> None:
    url = f"https://localhost:{server.base.port}/file"
    problem = await refused(url)
    assert problem.startswith("the host name localhost resolves to ")
    assert problem.endswith(f", which is loopback {PUBLIC_ONLY}")
    assert server.hits == []


async def test_an_ipv4_mapped_loopback_address_is_refused(server: Server) -> None:
    url = f"https://[::ffff:127.0.0.1]:{server.base.port}/file"
    problem = await refused(url)
    assert problem.startswith("the address ::ffff:")  # as Python spells it: 7f00:1 or 127.0.0.1
    assert problem.endswith(f" stands for 127.0.0.1, which is loopback {PUBLIC_ONLY}")
    assert server.hits == []


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://example.com/x", "plain http:// is refused (the hub fetches https:// URLs only)"),
        ("ftp://example.com/x", "ftp:// is not supported (the hub fetches https:// URLs only)"),
        ("file:///etc/passwd", "file:// is not supported (the hub fetches https:// URLs only)"),
        ("example.com/x", "not an absolute URL (the hub fetches https:// URLs only)"),
        ("https://user:pass@example.com/x", "a user name or password in the URL is refused"),
        ("https://user@example.com/x", "a user name or password in the URL is refused"),
        ("https://@example.com/x", "a user name or password in the URL is refused"),
        ("https:///x", "the URL names no host"),
        ("https://example.com:99999/x", "not a valid URL (Port out of range"),
        ("https://example.com:0/x", "the port 0 is not a valid port"),
        ("https://exa mple.com/x", "the URL contains spaces or control characters"),
        ("https://example.com/" + "a" * 2048, "the URL is longer than 2048 characters"),
        ("https://10.0.0.5/x", f"the address 10.0.0.5 is private {PUBLIC_ONLY}"),
        ("https://169.254.169.254/x", f"the address 169.254.169.254 is link-local {PUBLIC_ONLY}"),
        ("https://[::1]/x", f"the address ::1 is loopback {PUBLIC_ONLY}"),
    ],
)
async def test_bad_urls_are_refused(url: str, problem: str) -> None:
    assert (await refused(url, timeout_s=2)).startswith(problem)


# --- fetching ----------------------------------------------------------------------------------


async def test_allow_private_fetches_the_bytes(server: Server, trust: ssl.SSLContext) -> None:
    body = await fetch(server.url("/file"), max_bytes=1024, allow_private=True, ssl_context=trust)
    assert body == PAYLOAD
    assert server.hits == ["/file"]
    assert server.headers[0]["User-Agent"].startswith("deparrow-hub/")
    assert server.headers[0]["Accept-Encoding"] == "identity"
    assert "Authorization" not in server.headers[0]


async def test_allow_private_also_allows_plain_http(start: ServerFactory) -> None:
    plain = await start(tls=False)
    assert plain.url("/file").startswith("http://")
    assert await fetch(plain.url("/file"), max_bytes=1024, allow_private=True) == PAYLOAD


async def test_a_content_length_over_the_cap_is_refused(
    server: Server, trust: ssl.SSLContext
) -> None:
    problem = await refused(server.url("/big"), allow_private=True, ssl_context=trust)
    assert problem == "the file is 2048 bytes, larger than the hub's 1024-byte limit for an input"


async def test_a_chunked_body_over_the_cap_stops_reading(
    server: Server, trust: ssl.SSLContext
) -> None:
    # The server never stops sending: only the cap ends this before the timeout does.
    problem = await refused(
        server.url("/endless"), max_bytes=4096, allow_private=True, ssl_context=trust, timeout_s=3
    )
    assert problem == (
        "the file is larger than the hub's 4096-byte limit for an input (stopped reading there)"
    )


async def test_a_404_names_the_status(server: Server, trust: ssl.SSLContext) -> None:
    problem = await refused(server.url("/missing"), allow_private=True, ssl_context=trust)
    assert problem == "the server answered 404 Not Found"


async def test_a_redirect_chain_is_followed(server: Server, trust: ssl.SSLContext) -> None:
    body = await fetch(server.url("/hops/5"), max_bytes=1024, allow_private=True, ssl_context=trust)
    assert body == PAYLOAD
    assert server.hits == ["/hops/5", "/hops/4", "/hops/3", "/hops/2", "/hops/1", "/hops/0"]


async def test_too_many_redirects_are_refused(server: Server, trust: ssl.SSLContext) -> None:
    problem = await refused(
        server.url("/hops/3"), allow_private=True, ssl_context=trust, max_redirects=2
    )
    assert problem == "more than 2 redirects"
    assert server.hits == ["/hops/3", "/hops/2", "/hops/1"]


async def test_cookies_set_by_a_redirect_are_not_sent(
    server: Server, trust: ssl.SSLContext
) -> None:
    url = server.url("/to", url=server.url("/file"))
    assert await fetch(url, max_bytes=1024, allow_private=True, ssl_context=trust) == PAYLOAD
    assert server.hits == ["/to", "/file"]
    assert "Cookie" not in server.headers[1]


@pytest.mark.usefixtures("loopback_is_public")
async def test_a_redirect_to_plain_http_is_refused(server: Server, trust: ssl.SSLContext) -> None:
    # The same server over https, so that only the scheme is wrong.
    assert await fetch(server.url("/file"), max_bytes=1024, ssl_context=trust) == PAYLOAD
    target = str(URL(server.url("/file")).with_scheme("http"))
    problem = await refused(server.url("/to", url=target), ssl_context=trust)
    assert problem == (
        f"redirected to {target}: plain http:// is refused (the hub fetches https:// URLs only)"
    )
    assert server.hits == ["/file", "/to"]


@pytest.mark.usefixtures("loopback_is_public")
async def test_a_redirect_to_a_private_address_is_refused(
    server: Server, trust: ssl.SSLContext
) -> None:
    target = f"https://10.0.0.5:{server.base.port}/file"
    problem = await refused(server.url("/to", url=target), ssl_context=trust)
    assert problem == f"redirected to {target}: the address 10.0.0.5 is private {PUBLIC_ONLY}"
    assert server.hits == ["/to"]


async def test_an_untrusted_certificate_is_refused(server: Server) -> None:
    # No ssl_context: the system's CAs, which do not know the test CA.
    problem = await refused(server.url("/file"), allow_private=True)
    assert problem.startswith(
        "the server's TLS certificate was refused (certificate verify failed: "
    )
    assert server.hits == []


async def test_a_server_that_does_not_answer_times_out(
    server: Server, trust: ssl.SSLContext
) -> None:
    problem = await refused(
        server.url("/stall"), allow_private=True, ssl_context=trust, timeout_s=0.5
    )
    assert problem == "no complete answer within 0.5 seconds"
    assert server.hits == ["/stall"]


async def test_a_closed_port_is_a_connection_error(
    server: Server, trust: ssl.SSLContext, unused_tcp_port: int
) -> None:
    problem = await refused(
        f"https://127.0.0.1:{unused_tcp_port}/file", allow_private=True, ssl_context=trust
    )
    assert problem.startswith(f"could not connect to 127.0.0.1 port {unused_tcp_port} (")
