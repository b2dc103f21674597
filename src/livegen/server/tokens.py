"""Short-lived signed tokens: realtime tokens (``POST /rest/tokens/``) and CDN upload tokens.

JWTs signed with HS256 under a 256-bit secret kept in the data dir (created on first use,
mode 0600), so tokens survive restarts. Each kind has its own audience, so a token of one
kind is never accepted as the other; verification pins the algorithm (no ``alg=none``, no
algorithm confusion) and requires ``exp``.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jwt

from livegen.protocol.errors import Forbidden, Unauthorized

REALTIME = "livegen:realtime"
CDN = "livegen:cdn"
_ALGORITHM = "HS256"


@dataclass(frozen=True)
class TokenClaims:
    key_id: str
    apps: tuple[str, ...]
    expires_at: float


def load_secret(path: Path) -> bytes:
    """The signing secret, created (0600) the first time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        secret = secrets.token_bytes(32)
        f.write(secret)
    return secret


class TokenSigner:
    def __init__(self, secret: bytes, *, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._clock = clock

    def mint(self, audience: str, key_id: str, *, ttl_s: float, apps: tuple[str, ...] = ()) -> tuple[str, float]:
        now = self._clock()
        expires = now + ttl_s
        claims = {"aud": audience, "sub": key_id, "apps": list(apps), "iat": int(now), "nbf": int(now) - 1}
        claims["exp"] = int(expires)
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM), expires

    def seconds_left(self, claims: TokenClaims) -> float:
        """How long a verified token stays valid, by this signer's clock."""
        return claims.expires_at - self._clock()

    def verify(self, token: str, audience: str, *, app: str | None = None) -> TokenClaims:
        """Claims of a valid token; ``Unauthorized`` if invalid or expired, ``Forbidden`` if
        ``app`` (an alias) is not among its allowed apps."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                audience=audience,
                # exp and nbf are checked below against the injected clock.
                options={"require": ["exp", "aud", "sub"], "verify_exp": False, "verify_nbf": False},
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized("invalid token", public=True) from exc
        # A good signature does not make good claims: one of the wrong type is an invalid token, never a 500.
        expires_at = _time_claim(claims["exp"])
        not_before = _time_claim(claims.get("nbf", 0))
        key_id, apps = claims["sub"], claims.get("apps", [])
        if not isinstance(key_id, str) or not isinstance(apps, list) or not all(isinstance(a, str) for a in apps):
            raise Unauthorized("invalid token", public=True)
        now = self._clock()
        if now >= expires_at:
            raise Unauthorized("token expired", public=True)
        if now < not_before:
            raise Unauthorized("token not yet valid", public=True)
        if app is not None and app not in apps:
            raise Forbidden(f"this token is not valid for {app}", public=True)
        return TokenClaims(key_id, tuple(apps), expires_at)


def _time_claim(value: object) -> float:
    """A NumericDate claim (RFC 7519): a finite JSON number; bools, strings, null and lists are not."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthorized("invalid token", public=True)
    try:
        seconds = float(value)
    except OverflowError as exc:  # an integer too big for a float
        raise Unauthorized("invalid token", public=True) from exc
    if not math.isfinite(seconds):  # Python's json reads NaN and Infinity
        raise Unauthorized("invalid token", public=True)
    return seconds
