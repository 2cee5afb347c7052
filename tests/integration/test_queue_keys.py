"""The admission-token keys in Redis: encrypted at rest with the KEK, kept across restarts, one
key set however many replicas start at once, rotated with publish-ahead, and a wrong KEK stops
the service at start (not at the first admission)."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import jwt
import pytest
import pytest_asyncio

from meshkit.jwtkeys import KeyPolicy, KeyStoreError, RotationTooEarly
from meshkit.redis import AnyRedis, close, connect
from svc_queue.adapters.keystore import AdmissionKeyStore
from svc_queue.bootstrap import wire
from svc_queue.config import Settings

pytestmark = pytest.mark.integration

KEK = bytes(range(32))
KEK_TEXT = base64.urlsafe_b64encode(KEK).decode().rstrip("=")


def policy(ahead: int = 120) -> KeyPolicy:
    return KeyPolicy(publish_ahead=timedelta(seconds=ahead), access_ttl=timedelta(minutes=30),
                     clock_skew=timedelta(seconds=60), key_cache=timedelta(seconds=10))


@pytest_asyncio.fixture(loop_scope="session")
async def redis(redis_url: str) -> AsyncIterator[AnyRedis]:
    client = await connect(redis_url)
    yield client
    await close(client)


@pytest_asyncio.fixture(loop_scope="session")
async def key(redis: AnyRedis) -> AsyncIterator[str]:
    name = f"tp:queue:test:{uuid.uuid4().hex[:8]}:admission-keys"
    yield name
    await redis.delete(name)


def store(redis: AnyRedis, key: str, kek: bytes | None = KEK, ahead: int = 120) -> AdmissionKeyStore:
    return AdmissionKeyStore(redis, key, kek=kek, policy=policy(ahead), cache_seconds=0)


async def test_replicas_starting_together_make_one_encrypted_key_set(redis: AnyRedis, key: str) -> None:
    stores = [store(redis, key) for _ in range(5)]
    await asyncio.gather(*(s.ensure() for s in stores))
    jwks = [await s.jwks() for s in stores]
    assert all(j == jwks[0] for j in jwks) and len(jwks[0]) == 2  # current + next, once
    raw = (await redis.get(key)).decode()  # type: ignore[union-attr]
    assert "PRIVATE KEY" not in raw and "PRIVATE KEY" not in base64.b64decode(
        json.loads(raw)["keys"][0]["key"]).decode(errors="replace")
    assert {k["enc"] for k in json.loads(raw)["keys"]} == {"aes256gcm"}
    # a restart finds the same keys
    again = store(redis, key)
    await again.ensure()
    assert await again.jwks() == jwks[0]


async def test_a_wrong_or_missing_kek_stops_the_service_at_start(
        redis: AnyRedis, key: str, redis_url: str) -> None:
    await store(redis, key).ensure()
    with pytest.raises(KeyStoreError, match="TP_KEY_ENCRYPTION_KEY"):
        await store(redis, key, kek=bytes(32)).ensure()
    with pytest.raises(KeyStoreError, match="TP_KEY_ENCRYPTION_KEY"):
        await store(redis, key, kek=None).ensure()
    prefix = key.removesuffix(":admission-keys")
    with pytest.raises(KeyStoreError):
        await wire(Settings(grpc_port=0, redis_url=redis_url, kafka_bootstrap="127.0.0.1:1",
                            consume_events=False, redis_key_prefix=prefix,
                            key_encryption_key=base64.b64encode(bytes(32)).decode()))


async def test_keys_stored_in_clear_are_sealed_once_a_kek_is_set(redis: AnyRedis, key: str) -> None:
    await store(redis, key, kek=None).ensure()
    raw = json.loads((await redis.get(key)).decode())  # type: ignore[union-attr]
    assert {k["enc"] for k in raw["keys"]} == {"none"}
    await store(redis, key, kek=KEK).ensure()
    raw = json.loads((await redis.get(key)).decode())  # type: ignore[union-attr]
    assert {k["enc"] for k in raw["keys"]} == {"aes256gcm"}


async def test_rotation_publishes_ahead_and_keeps_the_retired_key(redis: AnyRedis, key: str) -> None:
    early = store(redis, key, ahead=120)
    await early.ensure()
    with pytest.raises(RotationTooEarly):
        await early.rotate()
    s = store(redis, key, ahead=0)
    await s.ensure()
    before = await s.jwks()
    old_token = await s.sign({"sub": "u", "aud": "x"})
    result = await s.rotate()
    assert result.rotated and result.current == before[1]["kid"]  # the published next key signs now
    after = await s.jwks()
    assert [k["kid"] for k in after][:1] == [before[1]["kid"]] and len(after) == 3
    assert before[0]["kid"] in {k["kid"] for k in after}  # retired, still published
    new_token = await s.sign({"sub": "u", "aud": "x"})
    assert jwt.get_unverified_header(new_token)["kid"] == result.current
    for token in (old_token, new_token):  # both verify against the published set
        kid = jwt.get_unverified_header(token)["kid"]
        jwk = next(k for k in after if k["kid"] == kid)
        assert jwt.decode(token, jwt.PyJWK(jwk), algorithms=["ES256"], audience="x")["sub"] == "u"
