"""Who is calling: API tokens are exchanged for short-lived JWTs, which every request carries.

Roles: user and agent (a wallet each), admin (sees and may do everything), and node (a node
speaking for itself, from the credentials in its node.json: it may read its own record and
nothing else). Only the hashes of API tokens and node passwords are stored.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import jwt

ALGORITHM = "HS256"
ISSUER = "deparrow-hub"
ROLES = ("user", "agent", "node", "admin")


class AuthError(Exception):
    """Missing, malformed, expired or forged credentials; the message says which."""


@dataclass(frozen=True)
class Identity:
    user_id: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_node(self) -> bool:
        return self.role == "node"


def issue(secret: str, user_id: str, role: str, ttl_s: int) -> tuple[str, int]:
    now = int(time.time())
    exp = now + ttl_s
    token = jwt.encode(
        {"sub": user_id, "role": role, "iat": now, "exp": exp, "iss": ISSUER},
        secret,
        algorithm=ALGORITHM,
    )
    return token, exp


# Verified tokens, so a busy client's every request does not pay for the signature check
# again: (secret, token) -> (identity, expiry). Bounded; an expired entry is never used.
_VERIFIED: OrderedDict[tuple[str, str], tuple[Identity, int]] = OrderedDict()
_VERIFIED_MAX = 4096


def verify(secret: str, token: str, now: float | None = None) -> Identity:
    """The caller a JWT names, if this hub signed it and it has not expired by `now` (this
    machine's clock when None): from the cache when it was verified before."""
    t = time.time() if now is None else now
    hit = _VERIFIED.get((secret, token))
    if hit is not None and hit[1] > t:
        return hit[0]
    who, exp = _verify(secret, token, t)
    _VERIFIED[(secret, token)] = (who, exp)
    if len(_VERIFIED) > _VERIFIED_MAX:
        _VERIFIED.popitem(last=False)
    return who


def _verify(secret: str, token: str, now: float) -> tuple[Identity, int]:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            # The expiry is checked below against `now`, as the cache checks it.
            options={"require": ["exp"], "verify_exp": False},
        )
    except jwt.InvalidTokenError as e:
        raise AuthError(f"invalid token: {e}") from None
    exp = claims["exp"]
    if isinstance(exp, bool) or not isinstance(exp, int):
        raise AuthError("invalid token: its expiry (exp) is not a whole number of seconds")
    if exp <= now:
        raise AuthError("token expired: exchange your API token for a new one")
    sub, role = claims.get("sub"), claims.get("role")
    if not isinstance(sub, str) or not isinstance(role, str):
        raise AuthError("invalid token: missing subject or role")
    if role not in ROLES:
        raise AuthError(f"invalid token: unknown role {role!r}")
    return Identity(sub, role), exp


def bearer(header: str | None) -> str:
    if not header:
        raise AuthError("missing Authorization header: send 'Authorization: Bearer <jwt>'")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthError("Authorization header must be 'Bearer <jwt>'")
    return value.strip()
