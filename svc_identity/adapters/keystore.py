"""The ES256 keys of user tokens, persisted in PostgreSQL (table ``signing_keys``).

The lifecycle rules are in ``domain/keys.py``; this module stores keys, encrypts their private
halves with the key-encryption key (AES-256-GCM, the kid as associated data), applies rotation
plans under a PostgreSQL advisory lock (so replicas starting or rotating together never create
duplicate keys; the unique partial indexes back that up), and keeps a short-lived in-memory copy
of the table so signing costs no query.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from meshkit.jwtkeys import ALG, CachedSigner, KeyStoreError, load_private, new_key, public_jwk, seal, unseal

from ..domain.keys import (
    KeyInfo,
    KeyPolicy,
    KeyState,
    Plan,
    plan_ensure,
    plan_maintenance,
    plan_rotation,
    published,
)

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key serializing key creation and rotation: the bytes of "tpidkeys".
KEY_LOCK = int.from_bytes(b"tpidkeys", "big", signed=True)
__all__ = ["ALG", "KeyStore", "KeyStoreError", "RotationResult", "new_key", "public_jwk", "seal", "unseal"]


# --- the store ---


@dataclass(frozen=True)
class _Row:
    info: KeyInfo
    jwk: dict[str, str]
    blob: bytes
    encryption: str


@dataclass(frozen=True)
class _Snapshot:
    loaded_at: float  # monotonic
    db_now: datetime
    rows: tuple[_Row, ...]
    current_kid: str
    jwks: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class RotationResult:
    rotated: bool
    retired: str | None
    current: str
    next: str
    deleted: tuple[str, ...]


class KeyStore(CachedSigner["_Snapshot"]):
    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        kek: bytes | None,
        policy: KeyPolicy,
        cache_seconds: float,
    ) -> None:
        super().__init__(cache_seconds)
        self.pool = pool
        self.kek = kek
        self.policy = policy

    # -- lifecycle --

    async def ensure(self) -> None:
        """At start: a current and a next key exist (created under the lock if not), and every
        key this replica may sign with can be decrypted (fail fast on a wrong KEK)."""
        async with self.pool.connection() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (KEY_LOCK,))
                rows, now = await self._read(conn)
                await self._apply(conn, plan_ensure([r.info for r in rows], now, self.policy))
                if self.kek is not None:  # a KEK was configured after keys were stored in clear
                    for r in rows:
                        if r.encryption == "none":
                            blob, encryption = seal(r.blob, r.info.kid, self.kek)
                            await conn.execute(
                                "UPDATE signing_keys SET private_key = %s, encryption = %s WHERE kid = %s",
                                (blob, encryption, r.info.kid),
                            )
                            log.info("signing key encrypted with the KEK", extra={"kid": r.info.kid})
        await self.reload()
        unencrypted = [r.info.kid for r in self._snap.rows if r.encryption == "none"] if self._snap else []
        if unencrypted:
            log.warning(
                "signing keys are stored without encryption (set TP_KEY_ENCRYPTION_KEY)",
                extra={"kids": unencrypted},
            )

    async def rotate(self) -> RotationResult:
        """Promote next → current, retire current, create a new next (domain.keys.plan_rotation);
        raises RotationTooEarly if the next key has not been published long enough."""
        return await self._locked(lambda infos, now: plan_rotation(infos, now, self.policy))

    async def maintain(self, rotate_after: float | None) -> RotationResult:
        """The periodic check (domain.keys.plan_maintenance)."""
        after = None if rotate_after is None else timedelta(seconds=rotate_after)
        return await self._locked(lambda infos, now: plan_maintenance(infos, now, self.policy, after))

    async def _locked(self, decide: Callable[[list[KeyInfo], datetime], Plan]) -> RotationResult:
        async with self.pool.connection() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (KEY_LOCK,))
                rows, now = await self._read(conn)
                plan = decide([r.info for r in rows], now)
                await self._apply(conn, plan)
        if not plan.empty or self._snap is None:
            await self.reload()
        assert self._snap is not None
        nxt = next(r.info.kid for r in self._snap.rows if r.info.state is KeyState.NEXT)
        result = RotationResult(
            rotated=plan.promote is not None,
            retired=plan.retire,
            current=self._snap.current_kid,
            next=nxt,
            deleted=plan.delete,
        )
        if result.rotated:
            log.info(
                "signing keys rotated",
                extra={"retired": result.retired, "current": result.current, "next": result.next,
                       "deleted": list(result.deleted)},
            )
        return result

    async def _read(self, conn: AsyncConnection[Any]) -> tuple[list[_Row], datetime]:
        cur = await conn.execute(
            "SELECT kid, state, created_at, activated_at, retired_at, public_jwk, private_key, "
            "encryption FROM signing_keys"
        )
        rows = await cur.fetchall()
        now_cur = await conn.execute("SELECT now()")
        now_row = await now_cur.fetchone()
        assert now_row is not None
        out = [
            _Row(
                info=KeyInfo(
                    kid=r[0], state=KeyState(r[1]), created_at=r[2], activated_at=r[3], retired_at=r[4]
                ),
                jwk=dict(r[5]),
                blob=bytes(r[6]),
                encryption=r[7],
            )
            for r in rows
        ]
        return out, now_row[0]

    async def _apply(self, conn: AsyncConnection[Any], plan: Plan) -> None:
        for note in plan.notes:
            log.warning("signing keys: %s", note)
        if plan.delete:
            await conn.execute("DELETE FROM signing_keys WHERE kid = ANY(%s)", (list(plan.delete),))
            log.info("retired signing keys removed from the JWKS", extra={"kids": list(plan.delete)})
        if plan.retire:
            await conn.execute(
                "UPDATE signing_keys SET state = 'retired', retired_at = now() WHERE kid = %s",
                (plan.retire,),
            )
        if plan.promote:
            await conn.execute(
                "UPDATE signing_keys SET state = 'current', activated_at = now() WHERE kid = %s",
                (plan.promote,),
            )
        for state, wanted in (("current", plan.create_current), ("next", plan.create_next)):
            if not wanted:
                continue
            jwk, blob, encryption = new_key(self.kek)
            await conn.execute(
                "INSERT INTO signing_keys (kid, state, private_key, encryption, public_jwk, activated_at) "
                "VALUES (%s, %s, %s, %s, %s, CASE WHEN %s = 'current' THEN now() END)",
                (jwk["kid"], state, blob, encryption, Jsonb(jwk), state),
            )
            log.info("signing key created", extra={"kid": jwk["kid"], "state": state})

    # -- reading --

    async def reload(self) -> None:
        async with self.pool.connection() as conn:
            rows, now = await self._read(conn)
        current = [r for r in rows if r.info.state is KeyState.CURRENT]
        if not current:
            raise KeyStoreError("no current signing key (run the service once to create one)")
        row = current[0]
        if row.info.kid not in self._private:
            key = load_private(row.blob, row.encryption, row.info.kid, self.kek)
            self._private = {row.info.kid: key}  # only the signing key is kept in memory
        by_kid = {r.info.kid: r for r in rows}
        jwks = tuple(by_kid[k.kid].jwk for k in published([r.info for r in rows], now, self.policy))
        self._snap = _Snapshot(time.monotonic(), now, tuple(rows), row.info.kid, jwks)

