"""Failed-login counters in Redis (the rules: ``domain/throttle.py``).

Each subject (an account, a client address) has two keys under one hash tag, so a script that
touches both works on Redis Cluster: ``{<prefix>:login:<kind>:<id>}:n`` (failures) and
``…:b`` (present while blocked, expiring when the block ends). A check is one round trip (a
pipeline of two PTTLs); recording a failure is one round trip (a pipeline of one script per
subject); Redis' own clock and expiry drive everything, so replicas agree and nothing is
permanent. If Redis is slow or down, logins are not throttled (and that is logged), rather than
every login failing.
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

# KEYS: failures, block. ARGV: threshold, window ms, backoff base ms, backoff max ms.
# Returns {failures, block ms}. Mirrors ThrottlePolicy.block_seconds.
_RECORD_FAILURE = """
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

    def _keys(self, kind: str, ident: str) -> tuple[str, str]:
        tag = f"{{{self.prefix}:login:{kind}:{ident}}}"
        return f"{tag}:n", f"{tag}:b"

    def _subjects(self, email: str, client: str) -> list[tuple[tuple[str, str], ThrottlePolicy]]:
        return [
            (self._keys("a", email_fingerprint(email)), self.account),
            (self._keys("c", client), self.client),
        ]

    async def check(self, email: str, client: str) -> None:
        """Raise TooManyAttempts while the account or the client is blocked."""
        subjects = self._subjects(email, client)

        async def run() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for (_, block_key), _policy in subjects:
                pipe.pttl(block_key)
            return await pipe.execute()  # type: ignore[no-any-return]

        ttls: list[Any] = await self._guard("check", run, [])
        wait_ms = max([int(t) for t in ttls if int(t) > 0], default=0)
        if wait_ms > 0:
            raise TooManyAttempts(wait_ms / 1000)

    async def failed(self, email: str, client: str) -> float:
        """Count a failure for the account and the client; the longest block it caused (s)."""
        subjects = self._subjects(email, client)

        async def run() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for keys, policy in subjects:
                pipe.eval(
                    _RECORD_FAILURE,
                    2,
                    *keys,
                    policy.threshold,
                    policy.window_seconds * 1000,
                    round(policy.backoff_base_seconds * 1000),
                    round(policy.backoff_max_seconds * 1000),
                )
            return await pipe.execute()  # type: ignore[no-any-return]

        results: list[Any] = await self._guard("record failure", run, [])
        return max((int(r[1]) for r in results), default=0) / 1000

    async def succeeded(self, email: str) -> None:
        """A successful login clears the account's failures (not the client's)."""
        keys = self._keys("a", email_fingerprint(email))

        async def run() -> int:
            return int(await self.redis.delete(*keys))  # both keys share one slot

        await self._guard("reset", run, 0)

    async def _guard(self, what: str, fn: Callable[[], Awaitable[T]], fallback: T) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await fn()
        except TimeoutError:
            log.warning("login throttle skipped: Redis too slow", extra={"step": what})
        except Exception as exc:  # Redis down: keep logins working, say so
            log.warning("login throttle skipped: %s", exc, extra={"step": what})
        return fallback
