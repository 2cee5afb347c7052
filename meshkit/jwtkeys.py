"""ES256 signing keys shared by every service that issues JWTs (identity's user tokens, the
queue's admission tokens): the key lifecycle rules (no I/O) and the crypto helpers.

Where the keys are stored is each service's business (identity: PostgreSQL ``signing_keys``;
queue: one Redis key); what a key is, how its private half is sealed with the key-encryption key
(AES-256-GCM, the kid as associated data), and when a key is published, signs, retires and leaves
the JWKS are the same everywhere and live here.

A verifier (Envoy) caches the JWKS for a while and does not refetch it when it meets an unknown
``kid``, so a key must be published before it signs anything and stay published until every
token it signed has expired:

    next ──(published >= publish_ahead)──▶ current ──(rotation)──▶ retired ──(retention)──▶ gone

* There is always exactly one ``current`` key (it signs) and one ``next`` key (published, not
  signing yet).
* Rotation promotes ``next`` to ``current`` only once it has been published for at least
  ``publish_ahead``, retires the old ``current`` and creates a new ``next``.
* A retired key stays published until ``retired_at + token TTL + clock skew + key cache``: the
  last token it signed expires by then, even if a replica that had not yet reloaded the key set
  signed with it a little after the rotation (at most ``key cache`` later).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ALG = "ES256"
KEK_SETTING = "TP_KEY_ENCRYPTION_KEY"


class KeyStoreError(RuntimeError):
    """The stored keys cannot be used (wrong or missing key-encryption key, corrupt entry)."""


# --- the key-encryption key --------------------------------------------------------------------


def decode_kek(text: str) -> bytes:
    """32 bytes from base64 or base64url text (padding optional); ValueError otherwise."""
    raw = text.strip()
    padded = raw + "=" * (-len(raw) % 4)
    try:
        key = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be base64 or base64url text of 32 random bytes") from None
    if len(key) != 32:
        raise ValueError(f"must decode to 32 bytes (AES-256), got {len(key)}")
    return key


# --- crypto helpers (pure) ---------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(public: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """RFC 7517 JWK of a P-256 public key, with ``kid`` = its RFC 7638 thumbprint."""
    nums = public.public_numbers()
    x, y = _b64url(nums.x.to_bytes(32, "big")), _b64url(nums.y.to_bytes(32, "big"))
    canonical = json.dumps({"crv": "P-256", "kty": "EC", "x": x, "y": y}, separators=(",", ":"))
    kid = _b64url(hashlib.sha256(canonical.encode()).digest())
    return {"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "use": "sig", "alg": ALG}


def seal(private_pem: bytes, kid: str, kek: bytes | None) -> tuple[bytes, str]:
    """Encrypt a private key's PEM for storage: (blob, encryption) with encryption "aes256gcm",
    or the PEM itself and "none" when no KEK is configured."""
    if kek is None:
        return private_pem, "none"
    nonce = os.urandom(12)
    return nonce + AESGCM(kek).encrypt(nonce, private_pem, kid.encode()), "aes256gcm"


def unseal(blob: bytes, encryption: str, kid: str, kek: bytes | None) -> bytes:
    if encryption == "none":
        return blob
    if encryption != "aes256gcm":
        raise KeyStoreError(f"signing key {kid}: unknown encryption {encryption!r}")
    if kek is None:
        raise KeyStoreError(f"signing key {kid} is encrypted but {KEK_SETTING} is not set")
    try:
        return AESGCM(kek).decrypt(blob[:12], blob[12:], kid.encode())
    except InvalidTag:
        raise KeyStoreError(
            f"signing key {kid} cannot be decrypted: {KEK_SETTING} is not the key it was stored with"
        ) from None


def new_key(kek: bytes | None) -> tuple[dict[str, str], bytes, str]:
    """A fresh P-256 key: (public JWK with kid, sealed private PEM, encryption)."""
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = public_jwk(private.public_key())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    blob, encryption = seal(pem, jwk["kid"], kek)
    return jwk, blob, encryption


def load_private(blob: bytes, encryption: str, kid: str, kek: bytes | None) -> ec.EllipticCurvePrivateKey:
    """The usable private key of a stored (sealed) key."""
    pem = unseal(blob, encryption, kid, kek)
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyStoreError(f"signing key {kid} is not an EC key")
    return key


# --- the lifecycle (pure rules) ----------------------------------------------------------------


class KeyState(enum.Enum):
    NEXT = "next"
    CURRENT = "current"
    RETIRED = "retired"


@dataclass(frozen=True)
class KeyInfo:
    kid: str
    state: KeyState
    created_at: datetime  # = published: it is in the JWKS from the moment it is stored
    activated_at: datetime | None = None
    retired_at: datetime | None = None


@dataclass(frozen=True)
class KeyPolicy:
    publish_ahead: timedelta
    access_ttl: timedelta  # the longest lifetime of a token these keys sign
    clock_skew: timedelta
    key_cache: timedelta

    def retained_until(self, key: KeyInfo) -> datetime | None:
        """When a retired key may leave the JWKS (None: it is not retired)."""
        if key.state is not KeyState.RETIRED or key.retired_at is None:
            return None
        return key.retired_at + self.access_ttl + self.clock_skew + self.key_cache


@dataclass(frozen=True)
class Plan:
    """What to change in the key set, in this order: delete, retire, promote, create."""

    delete: tuple[str, ...] = ()
    retire: str | None = None
    promote: str | None = None
    create_current: bool = False
    create_next: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not (self.delete or self.retire or self.promote or self.create_current or self.create_next)


class RotationTooEarly(Exception):
    """The next key has not been published long enough to start signing."""

    def __init__(self, kid: str, wait: timedelta) -> None:
        super().__init__(
            f"next key {kid} must stay published {wait.total_seconds():.0f}s more before it signs"
        )
        self.kid = kid
        self.wait = wait


def current_of(keys: list[KeyInfo]) -> KeyInfo | None:
    return next((k for k in keys if k.state is KeyState.CURRENT), None)


def next_of(keys: list[KeyInfo]) -> KeyInfo | None:
    return next((k for k in keys if k.state is KeyState.NEXT), None)


def published(keys: list[KeyInfo], now: datetime, policy: KeyPolicy) -> list[KeyInfo]:
    """The keys of the JWKS: next, current, and retired keys still within their retention.

    Ordered current, next, then retired (newest first), so a reader sees the signing key first.
    """
    order = {KeyState.CURRENT: 0, KeyState.NEXT: 1, KeyState.RETIRED: 2}
    out = [k for k in keys if not _expired(k, now, policy)]
    return sorted(out, key=lambda k: (order[k.state], -(k.retired_at or k.created_at).timestamp()))


def _expired(key: KeyInfo, now: datetime, policy: KeyPolicy) -> bool:
    until = policy.retained_until(key)
    return until is not None and until <= now


def plan_ensure(keys: list[KeyInfo], now: datetime, policy: KeyPolicy) -> Plan:
    """At start (under the key lock): make sure a current and a next key exist.

    A fresh install gets both at once (nothing can have cached an older JWKS). A set with a
    next key but no current one (should not happen) promotes it at once, since something must
    sign; that is logged.
    """
    current, nxt = current_of(keys), next_of(keys)
    delete = tuple(k.kid for k in keys if _expired(k, now, policy))
    if current is None and nxt is None:
        return Plan(delete=delete, create_current=True, create_next=True, notes=("fresh key set",))
    if current is None:
        assert nxt is not None
        return Plan(
            delete=delete,
            promote=nxt.kid,
            create_next=True,
            notes=(f"no current key: promoted next key {nxt.kid} without waiting",),
        )
    return Plan(delete=delete, create_next=nxt is None)


def plan_rotation(keys: list[KeyInfo], now: datetime, policy: KeyPolicy) -> Plan:
    """Manual rotation: promote next → current, retire current, create a new next.

    Raises RotationTooEarly if the next key has been published for less than ``publish_ahead``.
    """
    current, nxt = current_of(keys), next_of(keys)
    if current is None or nxt is None:
        return plan_ensure(keys, now, policy)
    delete = tuple(k.kid for k in keys if _expired(k, now, policy))
    age = now - nxt.created_at
    if age < policy.publish_ahead:
        raise RotationTooEarly(nxt.kid, policy.publish_ahead - age)
    return Plan(delete=delete, retire=current.kid, promote=nxt.kid, create_next=True)


def plan_maintenance(
    keys: list[KeyInfo], now: datetime, policy: KeyPolicy, rotate_after: timedelta | None
) -> Plan:
    """The periodic check: drop retired keys past their retention, and (automatic rotation,
    ``rotate_after`` set) rotate once the current key has signed that long and the next key has
    been published long enough. An empty plan when nothing is due."""
    current, nxt = current_of(keys), next_of(keys)
    if current is None or nxt is None:
        return plan_ensure(keys, now, policy)
    delete = tuple(k.kid for k in keys if _expired(k, now, policy))
    if rotate_after is None or now - (current.activated_at or current.created_at) < rotate_after:
        return Plan(delete=delete)
    if now - nxt.created_at < policy.publish_ahead:
        return Plan(delete=delete)
    return Plan(delete=delete, retire=current.kid, promote=nxt.kid, create_next=True)


class SignerSnapshot(Protocol):
    @property
    def loaded_at(self) -> float: ...  # time.monotonic() when it was read

    @property
    def current_kid(self) -> str: ...

    @property
    def jwks(self) -> tuple[dict[str, str], ...]: ...


SnapT = TypeVar("SnapT", bound=SignerSnapshot)


class CachedSigner(Generic[SnapT]):
    """What a key store does with its keys once read: a snapshot re-read at most every
    ``cache_seconds`` (one reader at a time), the published JWKS, and signing with the current
    key. A store (identity's in PostgreSQL, the queue's in Redis) implements ``reload()``, which
    sets ``_snap`` and keeps the current private key in ``_private``."""

    def __init__(self, cache_seconds: float) -> None:
        self.cache_seconds = cache_seconds
        self._snap: SnapT | None = None
        self._private: dict[str, ec.EllipticCurvePrivateKey] = {}
        self._reload_lock = asyncio.Lock()

    async def reload(self) -> None:
        raise NotImplementedError

    async def _fresh(self) -> SnapT:
        snap = self._snap
        if snap is not None and time.monotonic() - snap.loaded_at < self.cache_seconds:
            return snap
        async with self._reload_lock:
            snap = self._snap
            if snap is None or time.monotonic() - snap.loaded_at >= self.cache_seconds:
                await self.reload()
                snap = self._snap
        assert snap is not None
        return snap

    async def jwks(self) -> list[dict[str, str]]:
        """The published public keys (current, next, retired within retention)."""
        return [dict(k) for k in (await self._fresh()).jwks]

    async def sign(self, claims: dict[str, Any]) -> str:
        snap = await self._fresh()
        key = self._private[snap.current_kid]
        return jwt.encode(claims, key, algorithm=ALG, headers={"kid": snap.current_kid, "typ": "JWT"})

    async def current_kid(self) -> str:
        return (await self._fresh()).current_kid
