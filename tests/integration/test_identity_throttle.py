"""The failed-login throttle against a real Redis, single node and Redis Cluster (its scripts
touch one hash tag each, so they must work on both), and with Redis gone (logins go on)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from meshkit import redis as redis_
from svc_identity.adapters.throttle import LoginThrottle
from svc_identity.domain.throttle import ThrottlePolicy, TooManyAttempts

pytestmark = pytest.mark.integration

ACCOUNT = ThrottlePolicy(threshold=2, window_seconds=2, backoff_base_seconds=0.4, backoff_max_seconds=0.8)
CLIENT = ThrottlePolicy(threshold=4, window_seconds=2, backoff_base_seconds=0.4, backoff_max_seconds=0.8)


@pytest_asyncio.fixture(loop_scope="session", params=["single", "cluster"])
async def throttle(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[LoginThrottle]:
    if request.param == "cluster":
        url = request.getfixturevalue("redis_cluster_url")
        client = await redis_.connect(url, cluster=True)
    else:
        client = await redis_.connect(redis_url)
    yield LoginThrottle(client, prefix=f"test:identity:{uuid.uuid4().hex[:8]}", account=ACCOUNT,
                        client=CLIENT, timeout=2.0)
    await redis_.close(client)


async def test_blocks_after_the_threshold_grows_caps_and_expires(throttle: LoginThrottle) -> None:
    email = f"{uuid.uuid4().hex[:8]}@example.com"
    await throttle.begin(email, "198.51.100.1")
    assert await throttle.failed(email, "198.51.100.1") == 0
    assert await throttle.failed(email, "198.51.100.2") == pytest.approx(0.4)
    with pytest.raises(TooManyAttempts) as exc:
        await throttle.begin(email.upper(), "198.51.100.3")
    assert exc.value.metadata["retry_after_seconds"] == "1"
    await asyncio.sleep(0.45)
    await throttle.begin(email, "198.51.100.3")  # the block ended
    assert await throttle.failed(email, "198.51.100.3") == pytest.approx(0.8)
    assert await throttle.failed(email, "198.51.100.4") == pytest.approx(0.8)  # capped
    await asyncio.sleep(0.85)
    await throttle.begin(email, "198.51.100.5")
    await throttle.succeeded(email, "198.51.100.5")  # clears the account's count
    assert await throttle.failed(email, "198.51.100.6") == 0


async def test_counts_per_client_across_accounts(throttle: LoginThrottle) -> None:
    client = f"192.0.2.{uuid.uuid4().int % 200}"
    for _ in range(3):
        assert await throttle.failed(f"{uuid.uuid4().hex[:8]}@example.com", client) == 0
    assert await throttle.failed(f"{uuid.uuid4().hex[:8]}@example.com", client) == pytest.approx(0.4)
    with pytest.raises(TooManyAttempts):
        await throttle.begin(f"{uuid.uuid4().hex[:8]}@example.com", client)
    await throttle.begin(f"{uuid.uuid4().hex[:8]}@example.com", "192.0.2.250")


async def test_parallel_guesses_get_no_more_checks_than_failures_left(throttle: LoginThrottle) -> None:
    """A burst of guesses at one account: each is reserved before its password is checked, so
    only as many as the failures left before a block (2 here) get checked; the rest are refused
    at once. Checking first and counting after let the whole burst through."""
    email = f"{uuid.uuid4().hex[:8]}@example.com"

    async def guess(i: int) -> bool:
        try:
            await throttle.begin(email, f"198.51.100.{i}")
        except TooManyAttempts:
            return False
        await asyncio.sleep(0.05)  # the password check
        await throttle.failed(email, f"198.51.100.{i}")
        return True

    checked = await asyncio.gather(*(guess(i) for i in range(40)))
    assert sum(checked) == 2
    with pytest.raises(TooManyAttempts):  # and the two failures blocked the account
        await throttle.begin(email, "198.51.100.99")
    # A success gives its reservation back: after the block, one login then another go through.
    await asyncio.sleep(0.45)
    for _ in range(2):
        await throttle.begin(email, "198.51.100.7")
        await throttle.succeeded(email, "198.51.100.7")


async def test_many_fans_behind_one_address_sign_in_at_once(throttle: LoginThrottle) -> None:
    """A carrier's NAT: hundreds of accounts from one client address in the same second. Only
    an account is limited in flight; the client is only checked for a block."""
    nat = "100.64.0.1"
    emails = [f"{uuid.uuid4().hex[:8]}@example.com" for _ in range(100)]
    await asyncio.gather(*(throttle.begin(e, nat) for e in emails))
    await asyncio.gather(*(throttle.succeeded(e, nat) for e in emails))


async def test_redis_down_does_not_stop_logins() -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    throttle = LoginThrottle(dead, prefix="test:identity:dead", account=ACCOUNT, client=CLIENT, timeout=0.5)
    await throttle.begin("a@example.com", "192.0.2.1")
    assert await throttle.failed("a@example.com", "192.0.2.1") == 0
    await throttle.succeeded("a@example.com", "192.0.2.1")
    await dead.aclose()
