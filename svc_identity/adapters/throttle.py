"""Failed-login counters in Redis (the rules: ``domain/throttle.py``).

Each subject (an account, a client address) has three keys under one hash tag, so a script that
touches them works on Redis Cluster: ``{<prefix>:login:<kind>:<id>}:n`` (failures), ``…:b``
(present while blocked, expiring when the block ends) and ``…:p`` (guesses being checked right
now). An attempt is reserved before its password is checked (``begin``: one round trip, a
script per subject): an account may have only as many guesses in flight as failures it has left
before a block (at least one). Clients are only checked for a block (one address may be a
carrier's NAT with thousands of fans behind it). Without the reservation, a burst of parallel
guesses all passed the check before the first of them was counted (argon2 takes tens of
milliseconds): hundreds per block.
Recording the outcome releases the reservation. Redis' own clock and expiry drive everything, so
replicas agree and nothing is permanent (a reservation whose process died lapses in PENDING_MS).
If Redis is slow or down, logins are not throttled (and that is logged), rather than every login
failing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from meshkit.redis import AnyRedis

from ..domain.throttle import ThrottlePolicy, TooManyAttempts
from ..domain.users import email_fingerprint

log = logging.getLogger(__name__)
T = TypeVar("T")

PENDING_MS = 30_000  # a reserved attempt lapses after this, should its process die

# KEYS: failures, block, pending. ARGV: threshold, pending ms, reserve (1: count it in flight).
# Returns the block's ms left, -1 if the subject already has as many guesses in flight as it
# may, or 0: go ahead (reserved, if asked).
_BEGIN = """
local blocked = redis.call('PTTL', KEYS[2])
if blocked > 0 then return blocked end
if ARGV[3] ~= '1' then return 0 end
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
local p = tonumber(redis.call('GET', KEYS[3]) or '0')
if p >= math.max(tonumber(ARGV[1]) - n, 1) then return -1 end
redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return 0
"""

# KEYS: pending. Releases one reservation.
_RELEASE = """
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
return 0
"""

# KEYS: failures, block, pending. ARGV: threshold, window ms, backoff base ms, backoff max ms.
# Returns {failures, block ms}. Mirrors ThrottlePolicy.block_seconds. Releases the reservation.
_RECORD_FAILURE = """
if tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then redis.call('DECR', KEYS[3]) end
local n = redis.call('INCR', KEYS[1])
local threshold = tonumber(ARGV[1])
local block = 0
if n >= threshold then
  local excess = math.min(n - threshold, 40)
  block = math.floor(math.min(tonumber(ARGV[3]) * (2 ^ excess), tonumber(ARGV[4])))
  if block > 0 then
    redis.call('SET', KEYS[2], n, 'PX', block)
  end
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + block)
return {n, block}
"""


class LoginThrottle:
    def __init__(
        self,
        redis: AnyRedis,
        *,
        prefix: str,
        account: ThrottlePolicy,
        client: ThrottlePolicy,
        timeout: float,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.account = account
        self.client = client
        self.timeout = timeout

    def _keys(self, kind: str, ident: str) -> tuple[str, str, str]:
        tag = f"{{{self.prefix}:login:{kind}:{ident}}}"
        return f"{tag}:n", f"{tag}:b", f"{tag}:p"

    def _subjects(self, email: str, client: str) -> list[tuple[tuple[str, str, str], ThrottlePolicy]]:
        return [
            (self._keys("a", email_fingerprint(email)), self.account),
            (self._keys("c", client), self.client),
        ]

    async def begin(self, email: str, client: str) -> None:
        """Reserve one attempt for the account before the password is checked; raise
        TooManyAttempts while the account or the client is blocked, or the account has all its
        guesses left in flight. The outcome (failed / succeeded / released) gives the
        reservation back. A client is not limited in flight: a carrier's NAT puts thousands of
        fans behind one address, all signing in the minute a sale opens."""
        subjects = self._subjects(email, client)

        async def run() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for (keys, policy), reserve in zip(subjects, (1, 0), strict=True):
                pipe.eval(_BEGIN, 3, *keys, policy.threshold, PENDING_MS, reserve)
            return await pipe.execute()  # type: ignore[no-any-return]

        replies: list[Any] = await self._guard("begin", run, [])
        answers = [int(a) for a in replies]
        if not answers or all(a == 0 for a in answers):
            return
        await self._release([keys for (keys, _), a in zip(subjects, answers, strict=True) if a == 0])
        wait_ms = max(answers)
        raise TooManyAttempts(wait_ms / 1000 if wait_ms > 0 else 1.0)

    async def release(self, email: str, client: str) -> None:
        """Give the reservations back without an outcome (the check itself failed)."""
        await self._release([keys for keys, _ in self._subjects(email, client)])

    async def _release(self, subjects: list[tuple[str, str, str]]) -> None:
        async def run() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for _, _, pending in subjects:
                pipe.eval(_RELEASE, 1, pending)
            return await pipe.execute()  # type: ignore[no-any-return]

        if subjects:
            await self._guard("release", run, [])

    async def failed(self, email: str, client: str) -> float:
        """Count a failure for the account and the client; the longest block it caused (s)."""
        subjects = self._subjects(email, client)

        async def run() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for keys, policy in subjects:
                pipe.eval(
                    _RECORD_FAILURE,
                    3,
                    *keys,
                    policy.threshold,
                    policy.window_seconds * 1000,
                    round(policy.backoff_base_seconds * 1000),
                    round(policy.backoff_max_seconds * 1000),
                )
            return await pipe.execute()  # type: ignore[no-any-return]

        results: list[Any] = await self._guard("record failure", run, [])
        return max((int(r[1]) for r in results), default=0) / 1000

    async def succeeded(self, email: str, client: str) -> None:
        """A successful login clears the account's failures (not the client's) and gives both
        reservations back."""
        (account, _), (client_keys, _) = self._subjects(email, client)

        async def run() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(account[0], account[1])  # one slot: the same hash tag
            pipe.eval(_RELEASE, 1, account[2])
            pipe.eval(_RELEASE, 1, client_keys[2])
            return await pipe.execute()  # type: ignore[no-any-return]

        await self._guard("reset", run, [])

    async def _guard(self, what: str, fn: Callable[[], Awaitable[T]], fallback: T) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await fn()
        except TimeoutError:
            log.warning("login throttle skipped: Redis too slow", extra={"step": what})
        except Exception as exc:  # Redis down: keep logins working, say so
            log.warning("login throttle skipped: %s", exc, extra={"step": what})
        return fallback
