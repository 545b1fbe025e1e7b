"""Signing in to the dashboard: an API token is exchanged, on the server, for the same JWT
the REST API issues, kept in an HttpOnly, SameSite=Strict cookie. The browser's scripts never
see the token or the JWT, and no other site can make the browser send it (which is also what
keeps the dashboard's forms safe from cross-site posts)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
from aiohttp import web

from hub.api import auth
from hub.api.auth import AuthError, Identity

COOKIE = "dp_session"


def services(request: web.Request) -> Any:
    from hub.api.services import SERVICES

    return request.app[SERVICES]


def current(request: web.Request) -> Identity | None:
    """The signed-in identity, or None (no cookie, or an expired or forged one)."""
    token = request.cookies.get(COOKIE)
    if not token:
        return None
    try:
        return auth.verify(services(request).config.jwt_secret, token)
    except AuthError:
        return None


def require(request: web.Request) -> Identity:
    """The identity, or a redirect to the sign-in page that comes back here afterwards."""
    who = current(request)
    if who is None:
        target = request.rel_url.path_qs if request.method == "GET" else "/"
        expired = "&expired=1" if request.cookies.get(COOKIE) else ""
        raise web.HTTPSeeOther(f"/signin?next={quote(target, safe='')}{expired}")
    return who


def _safe_next(value: str | None) -> str:
    # Only paths on this hub: never send someone signing in off to another site.
    if not value or not value.startswith("/") or value.startswith("//"):
        return "/"
    return value


async def signin_page(request: web.Request) -> web.Response:
    if current(request) is not None:
        raise web.HTTPSeeOther(_safe_next(request.query.get("next")))
    notice = None
    if request.query.get("expired"):
        notice = "Your session ended. Sign in again to carry on."
    elif request.query.get("bye"):
        notice = "You are signed out."
    return aiohttp_jinja2.render_template(
        "signin.html",
        request,
        {"next": _safe_next(request.query.get("next")), "notice": notice, "errors": {}},
    )


async def signin(request: web.Request) -> web.Response:
    form = await request.post()
    token = str(form.get("token") or "").strip()
    target = _safe_next(str(form.get("next") or ""))
    svc = services(request)
    error = None
    user = None
    if not token:
        error = "Paste your API token (it starts with dpt_)."
    elif not token.startswith("dpt_"):
        error = (
            "That is not an API token: API tokens start with dpt_ (an enrollment token, dpe_, "
            "is for enrolling a node with edge-run)."
        )
    else:
        user = svc.store.user_by_token(token)
        if user is None:
            error = "This hub does not know that token. Check you copied all of it."
    if error is not None or user is None:
        return aiohttp_jinja2.render_template(
            "signin.html",
            request,
            {"next": target, "notice": None, "errors": {"token": error}},
            status=401,
        )
    if user["broker_hash"] is None and svc.store.fill_broker_hash(user["id"], token):
        svc.sync_broker()  # an account from before broker logins can now use MQTT too
    jwt, _exp = auth.issue(svc.config.jwt_secret, user["id"], user["role"], svc.config.jwt_ttl_s)
    response = web.HTTPSeeOther(target)
    response.set_cookie(
        COOKIE,
        jwt,
        max_age=int(svc.config.jwt_ttl_s),
        httponly=True,
        samesite="Strict",
        # Behind a TLS proxy the hub itself sees plain HTTP: its public URL says HTTPS.
        secure=request.secure or (svc.config.public_url or "").startswith("https://"),
        path="/",
    )
    raise response


async def signout(request: web.Request) -> web.Response:
    response = web.HTTPSeeOther("/signin?bye=1")
    response.del_cookie(COOKIE, path="/")
    raise response
