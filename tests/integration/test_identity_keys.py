"""The signing keys of user tokens, against real PostgreSQL: they survive restarts, replicas
starting together agree on one key set, rotation never leaves a verifier without the key of a
valid token, private keys are stored encrypted, and the public JWKS merges the queue's keys.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import jwt
import psycopg
import pytest
import pytest_asyncio
from ticketping.identity.v1 import identity_service_pb2 as pb
from ticketping.identity.v1 import identity_service_pb2_grpc as pb_grpc
from ticketping.queue.v1 import queue_service_pb2 as queue_pb
from ticketping.queue.v1 import queue_service_pb2_grpc as queue_grpc

from devstack.layout import Layout
from meshkit.server import App, start
from svc_identity.adapters.keystore import KeyStoreError
from svc_identity.bootstrap import create_server
from svc_identity.config import Settings
from svc_identity.domain.keys import RotationTooEarly
from tests.support import fresh_database

pytestmark = pytest.mark.integration

KEK = "a" * 43
PASSWORD = "correct horse battery"
JWK_FIELDS = ("kty", "crv", "x", "y", "kid", "use", "alg")


@pytest.fixture
def fresh_dsn(infra: Layout) -> Iterator[str]:
    """An empty database for one test (key tests care about the very first start)."""
    with fresh_database(infra) as dsn:
        yield dsn


def settings(dsn: str, redis_url: str, **over: Any) -> Settings:
    base: dict[str, Any] = {
        "grpc_port": 0,
        "postgres_dsn": dsn,
        "redis_url": redis_url,
        "redis_key_prefix": f"test:identity:{uuid.uuid4().hex[:8]}",
        "key_encryption_key": KEK,
        "key_publish_ahead_seconds": 0,
        "key_cache_seconds": 0,
        "log_json": False,
        "argon2_time_cost": 1,
        "argon2_memory_cost_kib": 256,
        "argon2_parallelism": 1,
    }
    base.update(over)
    return Settings(**base)


class Running:
    def __init__(self, app: App, channel: grpc.aio.Channel) -> None:
        self.app = app
        self.channel = channel
        self.stub = pb_grpc.IdentityServiceStub(channel)

    async def jwks(self) -> list[dict[str, str]]:
        reply = await self.stub.GetSigningKeys(pb.GetSigningKeysRequest())
        return [{f: getattr(k, f) for f in JWK_FIELDS} for k in reply.keys]

    async def public_kids(self) -> set[str]:
        return {k.kid for k in (await self.stub.GetJwks(pb.GetJwksRequest())).keys}

    async def token(self) -> str:
        address = f"k-{uuid.uuid4().hex[:10]}@example.com"
        try:
            await self.stub.CreateUser(pb.CreateUserRequest(email=address, password=PASSWORD))
        except grpc.aio.AioRpcError:
            pass
        reply = await self.stub.CreateSession(pb.CreateSessionRequest(email=address, password=PASSWORD))
        return reply.access_token

    async def stop(self) -> None:
        await self.channel.close()
        await self.app.stop(0.5)


async def serve(s: Settings) -> Running:
    app = await create_server(s)
    await start(app)
    return Running(app, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}"))


@pytest_asyncio.fixture(loop_scope="session")
async def running() -> AsyncIterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:
        await r.stop()


def verifies(token: str, jwks: list[dict[str, str]]) -> bool:
    kid = jwt.get_unverified_header(token)["kid"]
    match = [k for k in jwks if k["kid"] == kid]
    if not match:
        return False
    jwt.decode(token, jwt.PyJWK.from_dict(match[0]), algorithms=["ES256"], audience="ticketping")
    return True


def key_rows(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT kid, state, encryption, private_key FROM signing_keys "
                            "ORDER BY created_at").fetchall()


async def test_replicas_starting_together_create_one_key_set(
    fresh_dsn: str, redis_url: str, running: list[Running]
) -> None:
    replicas = await asyncio.gather(*(serve(settings(fresh_dsn, redis_url)) for _ in range(4)))
    running.extend(replicas)
    rows = key_rows(fresh_dsn)
    assert sorted(state for _, state, _, _ in rows) == ["current", "next"]
    kids = [{k["kid"] for k in await r.jwks()} for r in replicas]
    assert all(k == kids[0] for k in kids) and len(kids[0]) == 2
    tokens = [await r.token() for r in replicas]
    assert len({jwt.get_unverified_header(t)["kid"] for t in tokens}) == 1


async def test_keys_survive_a_restart_and_are_stored_encrypted(
    fresh_dsn: str, redis_url: str, running: list[Running]
) -> None:
    first = await serve(settings(fresh_dsn, redis_url))
    token = await first.token()
    kid = jwt.get_unverified_header(token)["kid"]
    before = await first.jwks()
    await first.stop()

    second = await serve(settings(fresh_dsn, redis_url))
    running.append(second)
    assert jwt.get_unverified_header(await second.token())["kid"] == kid
    assert await second.jwks() == before
    assert verifies(token, await second.jwks())
    for _, _, encryption, private_key in key_rows(fresh_dsn):
        assert encryption == "aes256gcm" and b"PRIVATE KEY" not in bytes(private_key)


async def test_keys_stored_in_clear_are_encrypted_once_a_kek_is_set(
    fresh_dsn: str, redis_url: str, running: list[Running]
) -> None:
    first = await serve(settings(fresh_dsn, redis_url, key_encryption_key=None))
    token = await first.token()
    await first.stop()
    assert {enc for _, _, enc, _ in key_rows(fresh_dsn)} == {"none"}
    second = await serve(settings(fresh_dsn, redis_url))
    running.append(second)
    assert {enc for _, _, enc, _ in key_rows(fresh_dsn)} == {"aes256gcm"}
    assert verifies(token, await second.jwks())
    assert jwt.get_unverified_header(await second.token())["kid"] == jwt.get_unverified_header(token)["kid"]


async def test_a_wrong_or_missing_kek_stops_the_start(fresh_dsn: str, redis_url: str) -> None:
    first = await serve(settings(fresh_dsn, redis_url))
    await first.stop()
    with pytest.raises(KeyStoreError, match="cannot be decrypted"):
        await create_server(settings(fresh_dsn, redis_url, key_encryption_key="b" * 43))
    with pytest.raises(KeyStoreError, match="TP_KEY_ENCRYPTION_KEY is not set"):
        await create_server(settings(fresh_dsn, redis_url, key_encryption_key=None))


async def test_rotation_keeps_the_old_key_published_and_adds_a_new_next(
    fresh_dsn: str, redis_url: str, running: list[Running]
) -> None:
    a = await serve(settings(fresh_dsn, redis_url))
    b = await serve(settings(fresh_dsn, redis_url))  # another replica
    running.extend([a, b])
    old_token = await a.token()
    before = [k["kid"] for k in await a.jwks()]
    current, nxt = before  # current first, then next
    assert jwt.get_unverified_header(old_token)["kid"] == current

    result = await _rotate(fresh_dsn, redis_url)  # as `rotate-keys` does, from outside
    assert (result.retired, result.current) == (current, nxt)

    after = await b.jwks()
    kids = [k["kid"] for k in after]
    assert kids[:2] == [nxt, result.next] and current in kids and len(kids) == 3
    assert verifies(old_token, after)  # a token of the retired key still verifies
    new_token = await b.token()  # the other replica signs with the promoted key
    assert jwt.get_unverified_header(new_token)["kid"] == nxt and verifies(new_token, after)
    assert {current, nxt, result.next} <= await b.public_kids()

    # once every token of the retired key has expired, it leaves the JWKS (and the table)
    with psycopg.connect(fresh_dsn) as conn:
        conn.execute("UPDATE signing_keys SET retired_at = now() - interval '1 hour' WHERE kid = %s",
                     (current,))
    assert current not in {k["kid"] for k in await b.jwks()}
    await _maintain(fresh_dsn, redis_url)
    assert current not in {kid for kid, _, _, _ in key_rows(fresh_dsn)}


async def test_rotation_waits_until_the_next_key_was_published_long_enough(
    fresh_dsn: str, redis_url: str, running: list[Running]
) -> None:
    running.append(await serve(settings(fresh_dsn, redis_url, key_publish_ahead_seconds=120)))
    before = key_rows(fresh_dsn)
    with pytest.raises(RotationTooEarly) as exc:
        await _rotate(fresh_dsn, redis_url, key_publish_ahead_seconds=120)
    assert 100 < exc.value.wait.total_seconds() <= 120
    assert key_rows(fresh_dsn) == before


async def test_automatic_rotation(fresh_dsn: str, redis_url: str, running: list[Running]) -> None:
    r = await serve(settings(fresh_dsn, redis_url, key_rotation_interval_seconds=1))
    running.append(r)
    first = jwt.get_unverified_header(await r.token())["kid"]
    for _ in range(50):
        await asyncio.sleep(0.2)
        if jwt.get_unverified_header(await r.token())["kid"] != first:
            break
    else:
        pytest.fail("the key did not rotate")
    states = sorted(state for _, state, _, _ in key_rows(fresh_dsn))
    assert states.count("current") == 1 and states.count("next") == 1 and "retired" in states


async def _rotate(dsn: str, redis_url: str, **over: Any):  # type: ignore[no-untyped-def]
    import contextlib

    from svc_identity.bootstrap import open_identity

    async with contextlib.AsyncExitStack() as stack:
        identity = await open_identity(stack, settings(dsn, redis_url, **over), serving=False)
        return await identity.keys.rotate()


async def _maintain(dsn: str, redis_url: str) -> None:
    import contextlib

    from svc_identity.bootstrap import open_identity

    async with contextlib.AsyncExitStack() as stack:
        identity = await open_identity(stack, settings(dsn, redis_url), serving=False)
        await identity.keys.maintain(None)


# -- the public JWKS with the queue's admission keys ---------------------------------------------


class FakeQueue(queue_grpc.QueueServiceServicer):
    KEY = queue_pb.JsonWebKey(kty="EC", crv="P-256", x="qx", y="qy", kid="queue-key-1", use="sig",
                              alg="ES256")

    async def GetAdmissionKeys(self, request: Any, context: Any) -> queue_pb.GetAdmissionKeysResponse:
        return queue_pb.GetAdmissionKeysResponse(keys=[self.KEY])


@pytest_asyncio.fixture(loop_scope="session")
async def fake_queue() -> AsyncIterator[str]:
    server = grpc.aio.server()
    queue_grpc.add_QueueServiceServicer_to_server(FakeQueue(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


async def test_public_jwks_merges_admission_keys_and_the_internal_one_does_not(
    fresh_dsn: str, redis_url: str, fake_queue: str, running: list[Running]
) -> None:
    r = await serve(settings(fresh_dsn, redis_url, queue_addr=fake_queue))
    running.append(r)
    own = {k["kid"] for k in await r.jwks()}
    public = await r.stub.GetJwks(pb.GetJwksRequest())
    assert {k.kid for k in public.keys} == own | {"queue-key-1"}
    queue_key = next(k for k in public.keys if k.kid == "queue-key-1")
    assert (queue_key.x, queue_key.y, queue_key.alg) == ("qx", "qy", "ES256")
    assert "queue-key-1" not in own


@pytest.mark.parametrize("where", ["closed port", "no queue service"])
async def test_public_jwks_without_the_queue_has_identity_keys(
    fresh_dsn: str, redis_url: str, running: list[Running], where: str
) -> None:
    if where == "closed port":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            addr = f"127.0.0.1:{s.getsockname()[1]}"
        r = await serve(settings(fresh_dsn, redis_url, queue_addr=addr))
    else:
        other = await serve(settings(fresh_dsn, redis_url))  # answers UNIMPLEMENTED for the queue
        running.append(other)
        r = await serve(settings(fresh_dsn, redis_url, queue_addr=f"127.0.0.1:{other.app.port}"))
    running.append(r)
    assert await r.public_kids() == {k["kid"] for k in await r.jwks()}
