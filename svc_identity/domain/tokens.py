"""Access-token claims and refresh-token rules. Plain values, no I/O.

Access token: an ES256 JWT with header ``kid`` and the claims ``iss``, ``aud``, ``sub`` (user id),
``role`` (USER or ADMIN), ``iat``, ``exp`` (at most 15 minutes after ``iat``) and ``jti``.

Refresh token: 32 random bytes, base64url without padding (43 characters), opaque to clients.
Only its SHA-256 is stored. Tokens belong to a family (one login); every use spends the token
and issues the next one of the same family; presenting a spent token again means it was copied,
so the whole family is revoked.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from meshkit.errors import InvalidArgument, Unauthenticated

from .users import Role

MAX_ACCESS_TTL_SECONDS = 900  # 15 minutes
REFRESH_TOKEN_BYTES = 32  # 256 bits
TOKEN_TYPE = "Bearer"


@dataclass(frozen=True)
class AccessClaims:
    iss: str
    aud: str
    sub: str
    role: str
    iat: int
    exp: int
    jti: str

    def as_dict(self) -> dict[str, str | int]:
        return {
            "iss": self.iss,
            "aud": self.aud,
            "sub": self.sub,
            "role": self.role,
            "iat": self.iat,
            "exp": self.exp,
            "jti": self.jti,
        }


def access_claims(
    *,
    user_id: uuid.UUID,
    role: Role,
    now: datetime,
    ttl_seconds: int,
    issuer: str,
    audience: str,
    jti: str | None = None,
) -> AccessClaims:
    if not 0 < ttl_seconds <= MAX_ACCESS_TTL_SECONDS:
        raise ValueError(f"access token lifetime must be 1..{MAX_ACCESS_TTL_SECONDS} s, not {ttl_seconds}")
    iat = int(now.timestamp())
    return AccessClaims(
        iss=issuer,
        aud=audience,
        sub=str(user_id),
        role=role.value,
        iat=iat,
        exp=iat + ttl_seconds,
        jti=jti or uuid.uuid4().hex,
    )


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    user_id: uuid.UUID


# --- refresh tokens ---


def new_refresh_token() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(REFRESH_TOKEN_BYTES)).rstrip(b"=").decode()


def refresh_token_hash(token: str) -> bytes | None:
    """SHA-256 of the token's raw bytes, or None if the text cannot be one of our tokens."""
    text = token.strip()
    if len(text) != 43:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=")
    except (binascii.Error, ValueError):
        return None
    if len(raw) != REFRESH_TOKEN_BYTES or base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != text:
        return None
    return hashlib.sha256(raw).digest()


def require_refresh_token(token: str) -> str:
    if not token.strip():
        raise InvalidArgument("REFRESH_TOKEN_REQUIRED", "refresh_token is required")
    return token


@dataclass(frozen=True)
class StoredRefreshToken:
    """A refresh token's row with its family's state, as read under a row lock."""

    family_id: uuid.UUID
    user_id: uuid.UUID
    user_role: Role
    expires_at: datetime
    used_at: datetime | None
    revoked_at: datetime | None
    family_revoked_at: datetime | None


class RefreshVerdict(enum.Enum):
    ROTATE = "ROTATE"  # spend it, issue the next token of the family
    REUSED = "REUSED"  # already spent: revoke the whole family
    REVOKED = "REVOKED"
    EXPIRED = "EXPIRED"
    UNKNOWN = "UNKNOWN"


def judge_refresh(token: StoredRefreshToken | None, now: datetime) -> RefreshVerdict:
    if token is None:
        return RefreshVerdict.UNKNOWN
    if token.family_revoked_at is not None or token.revoked_at is not None:
        return RefreshVerdict.REVOKED
    if token.used_at is not None:
        return RefreshVerdict.REUSED
    if token.expires_at <= now:
        return RefreshVerdict.EXPIRED
    return RefreshVerdict.ROTATE


def refresh_error(verdict: RefreshVerdict) -> Unauthenticated:
    """The 401 a client gets for a refresh token it may not use."""
    if verdict is RefreshVerdict.REUSED:
        return Unauthenticated(
            "REFRESH_TOKEN_REUSED",
            "this refresh token was already used; its session is revoked, log in again",
        )
    if verdict is RefreshVerdict.REVOKED:
        return Unauthenticated("REFRESH_TOKEN_REVOKED", "this session was revoked; log in again")
    if verdict is RefreshVerdict.EXPIRED:
        return Unauthenticated("REFRESH_TOKEN_EXPIRED", "this session expired; log in again")
    return Unauthenticated("INVALID_REFRESH_TOKEN", "unknown refresh token; log in again")


def refresh_expiry(now: datetime, ttl_seconds: int) -> datetime:
    return now + timedelta(seconds=ttl_seconds)
