"""The ES256 keys that sign admission tokens, persisted in Redis (the queue has no database).

The key set is one JSON document in one Redis key (``<prefix>:admission-keys``): each key's
public JWK, its private half sealed with the key-encryption key (AES-256-GCM, the kid as
associated data; ``TP_KEY_ENCRYPTION_KEY``), its state and times. The lifecycle (publish ahead,
rotate, retire, drop) is meshkit's (``meshkit/jwtkeys.py``), the same rules as identity's user-token
keys. Changes are compare-and-set (a Lua script): replicas starting or rotating together never
create two key sets; the loser re-reads and re-plans. Time is Redis' clock.

If Redis loses the key set (FLUSHALL, failover to an empty replica), the next read of any replica
that had read it puts back the set it last saw, as it was (same kids, private halves still
sealed), by the same compare-and-set: the keys the edge and booking already trust (the edge caches
the JWKS for 30 s) keep verifying what is signed next. Only if no running replica ever read the
set is a fresh one made, at once, rather than at the next maintenance.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from meshkit.jwtkeys import (
    CachedSigner,
    KeyInfo,
    KeyPolicy,
    KeyState,
    KeyStoreError,
    Plan,
    load_private,
    new_key,
    plan_ensure,
    plan_maintenance,
    plan_rotation,
    published,
    seal,
)
from meshkit.redis import AnyRedis

log = logging.getLogger(__name__)

_READ = """
local t = redis.call('TIME')
return {redis.call('GET', KEYS[1]) or '', t[1], t[2]}
"""
_CAS = """
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""
MAX_ATTEMPTS = 20


@dataclass(frozen=True)
class _Key:
    info: KeyInfo
    jwk: dict[str, str]
    blob: bytes
    encryption: str

    def to_json(self) -> dict[str, Any]:
        def ms(t: datetime | None) -> int | None:
            return None if t is None else int(t.timestamp() * 1000)

        return {"kid": self.info.kid, "state": self.info.state.value, "created": ms(self.info.created_at),
                "activated": ms(self.info.activated_at), "retired": ms(self.info.retired_at),
                "jwk": self.jwk, "key": base64.b64encode(self.blob).decode(), "enc": self.encryption}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _Key:
        def dt(v: int | None) -> datetime | None:
            return None if v is None else datetime.fromtimestamp(v / 1000, UTC)

        created = dt(d["created"])
        assert created is not None
        return cls(KeyInfo(d["kid"], KeyState(d["state"]), created, dt(d["activated"]), dt(d["retired"])),
                   dict(d["jwk"]), base64.b64decode(d["key"]), d["enc"])


def _dump(keys: list[_Key]) -> str:
    return json.dumps({"keys": [k.to_json() for k in keys]}, sort_keys=True, separators=(",", ":"))


def _parse(raw: str) -> list[_Key]:
    if not raw:
        return []
    try:
        return [_Key.from_json(d) for d in json.loads(raw)["keys"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyStoreError(f"the stored admission key set is not readable: {exc}") from None


@dataclass(frozen=True)
class _Snapshot:
    loaded_at: float  # monotonic
    current_kid: str
    jwks: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class RotationResult:
    rotated: bool
    current: str
    next: str
    deleted: tuple[str, ...]


class AdmissionKeyStore(CachedSigner["_Snapshot"]):
    def __init__(
        self, redis: AnyRedis, key: str, *, kek: bytes | None, policy: KeyPolicy, cache_seconds: float
    ) -> None:
        super().__init__(cache_seconds)
        self.redis = redis
        self.key = key
        self.kek = kek
        self.policy = policy
        self._read_script = redis.register_script(_READ)
        self._cas_script = redis.register_script(_CAS)
        self._last_seen = ""  # the stored key set as last read (JSON), to put back if it vanishes

    # -- storage --

    async def _read(self) -> tuple[str, list[_Key], datetime]:
        text, now = await self._read_raw()
        if not text and self._last_seen:
            # The key set vanished from Redis: put back the one we last saw (another replica
            # may have done so first; then the compare-and-set changes nothing).
            if int(await self._cas_script(keys=[self.key], args=["", self._last_seen])):
                log.warning("admission key set was missing from Redis; restored the one last read",
                            extra={"kids": [k.info.kid for k in _parse(self._last_seen)]})
            text, now = await self._read_raw()
        keys = _parse(text)
        if text:
            self._last_seen = text
        return text, keys, now

    async def _read_raw(self) -> tuple[str, datetime]:
        raw, sec, usec = await self._read_script(keys=[self.key])
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return text, datetime.fromtimestamp(int(sec) + int(usec) / 1e6, UTC)

    def _apply(self, keys: list[_Key], plan: Plan, now: datetime) -> list[_Key]:
        for note in plan.notes:
            log.warning("admission keys: %s", note)
        out = [k for k in keys if k.info.kid not in plan.delete]
        out = [
            replace(k, info=replace(k.info, state=KeyState.RETIRED, retired_at=now))
            if k.info.kid == plan.retire else k
            for k in out
        ]
        out = [
            replace(k, info=replace(k.info, state=KeyState.CURRENT, activated_at=now))
            if k.info.kid == plan.promote else k
            for k in out
        ]
        for state, wanted in ((KeyState.CURRENT, plan.create_current), (KeyState.NEXT, plan.create_next)):
            if wanted:
                jwk, blob, encryption = new_key(self.kek)
                out.append(_Key(KeyInfo(jwk["kid"], state, now, now if state is KeyState.CURRENT else None),
                                jwk, blob, encryption))
        if self.kek is not None:  # a KEK configured after keys were stored in clear
            for i, k in enumerate(out):
                if k.encryption == "none":
                    blob, encryption = seal(k.blob, k.info.kid, self.kek)
                    out[i] = replace(k, blob=blob, encryption=encryption)
        return out

    async def _change(self, decide: Callable[[list[KeyInfo], datetime], Plan]) -> Plan:
        for _ in range(MAX_ATTEMPTS):
            raw, keys, now = await self._read()
            plan = decide([k.info for k in keys], now)
            new = self._apply(keys, plan, now)
            if new == keys:
                return plan
            if int(await self._cas_script(keys=[self.key], args=[raw, _dump(new)])):
                old = {x.info.kid for x in keys}
                for k in new:
                    if k.info.kid not in old:
                        log.info("admission key created",
                                 extra={"kid": k.info.kid, "state": k.info.state.value})
                return plan
        raise KeyStoreError("the admission key set kept changing under us; giving up for now")

    # -- lifecycle --

    async def ensure(self) -> None:
        """At start: a current and a next key exist, and the current one can be decrypted (a
        wrong KEK stops the service here, not at the first admission)."""
        await self._change(lambda infos, now: plan_ensure(infos, now, self.policy))
        await self.reload()

    async def rotate(self) -> RotationResult:
        """next → current, current → retired, a new next (RotationTooEarly if next is too young)."""
        return await self._result(await self._change(lambda i, n: plan_rotation(i, n, self.policy)))

    async def maintain(self, rotate_after: float | None) -> RotationResult:
        after = None if rotate_after is None else timedelta(seconds=rotate_after)
        plan = await self._change(lambda i, n: plan_maintenance(i, n, self.policy, after))
        return await self._result(plan)

    async def _result(self, plan: Plan) -> RotationResult:
        await self.reload()
        _, keys, _ = await self._read()
        nxt = next(k.info.kid for k in keys if k.info.state is KeyState.NEXT)
        assert self._snap is not None
        result = RotationResult(plan.promote is not None, self._snap.current_kid, nxt, plan.delete)
        if result.rotated:
            log.info("admission keys rotated", extra={"current": result.current, "next": result.next})
        return result

    # -- reading --

    async def reload(self) -> None:
        _, keys, now = await self._read()
        if not keys:  # gone from Redis and never read by this replica: a fresh set, now
            await self._change(lambda infos, at: plan_ensure(infos, at, self.policy))
            _, keys, now = await self._read()
        current = [k for k in keys if k.info.state is KeyState.CURRENT]
        if not current:
            raise KeyStoreError("no current admission key")
        row = current[0]
        if row.info.kid not in self._private:
            self._private = {row.info.kid: load_private(row.blob, row.encryption, row.info.kid, self.kek)}
        by_kid = {k.info.kid: k for k in keys}
        jwks = tuple(by_kid[i.kid].jwk for i in published([k.info for k in keys], now, self.policy))
        self._snap = _Snapshot(time.monotonic(), row.info.kid, jwks)

