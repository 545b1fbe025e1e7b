"""Verified JWTs are cached (hub/api/auth.py): a busy client's requests skip the signature check,
and the cache never lets through what the check would refuse. Times are injected: `now`."""

from __future__ import annotations

import jwt
import pytest

from hub.api import auth

SECRET = "s" * 64
T0 = 1_700_000_000.0  # 2023: every expiry here is checked against the injected `now` alone


def _token(exp: object, secret: str = SECRET, sub: str = "u_1", role: str = "user") -> str:
    claims = {"sub": sub, "role": role, "iat": int(T0), "exp": exp, "iss": auth.ISSUER}
    return jwt.encode(claims, secret, algorithm=auth.ALGORITHM)


def test_a_verified_token_is_served_from_the_cache_until_it_expires() -> None:
    token = _token(int(T0) + 60)
    first = auth.verify(SECRET, token, now=T0)
    assert first == auth.Identity("u_1", "user")
    assert auth.verify(SECRET, token, now=T0 + 59.9) is first  # the cached identity, as is
    with pytest.raises(auth.AuthError, match="token expired"):
        auth.verify(SECRET, token, now=T0 + 60)  # cached, and expired all the same


def test_an_expired_token_is_refused_the_first_time_too() -> None:
    with pytest.raises(auth.AuthError, match="token expired"):
        auth.verify(SECRET, _token(int(T0)), now=T0)


def test_what_the_check_refuses_is_never_cached() -> None:
    forged = _token(int(T0) + 60, secret="x" * 64)
    for _ in range(2):
        with pytest.raises(auth.AuthError, match="invalid token: Signature"):
            auth.verify(SECRET, forged, now=T0)
    assert (SECRET, forged) not in auth._VERIFIED
    with pytest.raises(auth.AuthError, match="not a whole number"):
        auth.verify(SECRET, _token(T0 + 60.5), now=T0)
    with pytest.raises(auth.AuthError, match="unknown role"):
        auth.verify(SECRET, _token(int(T0) + 60, role="root"), now=T0)


def test_a_token_verified_under_one_secret_is_checked_again_under_another() -> None:
    token = _token(int(T0) + 60)
    auth.verify(SECRET, token, now=T0)
    with pytest.raises(auth.AuthError, match="invalid token"):
        auth.verify("t" * 64, token, now=T0)  # a new key: the cache is keyed by it too


def test_the_cache_holds_at_most_its_bound() -> None:
    for i in range(auth._VERIFIED_MAX + 10):
        auth.verify(SECRET, _token(int(T0) + 60, sub=f"u_{i}"), now=T0)
    assert len(auth._VERIFIED) == auth._VERIFIED_MAX
