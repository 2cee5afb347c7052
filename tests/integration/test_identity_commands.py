"""`python -m svc_identity create-admin | ensure-user | rotate-keys` as an operator runs them: real
processes on the service's settings and database, checked through the running service."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import jwt
import pytest
import pytest_asyncio
from ticketping.identity.v1 import identity_service_pb2 as pb
from ticketping.identity.v1 import identity_service_pb2_grpc as pb_grpc

from devstack.layout import ROOT
from meshkit.errors import error_info
from meshkit.server import start
from svc_identity.bootstrap import create_server
from svc_identity.config import Settings

pytestmark = pytest.mark.integration

KEK = "c" * 43
FAST = {"TP_ARGON2_TIME_COST": "1", "TP_ARGON2_MEMORY_COST_KIB": "256", "TP_ARGON2_PARALLELISM": "1"}


def env(pg_dsn: str, **extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("TP_")}
    out.update({"TP_POSTGRES_DSN": pg_dsn, "TP_KEY_ENCRYPTION_KEY": KEK, "TP_LOG_JSON": "false", **FAST})
    out.update(extra)
    return out


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


async def run(pg_dsn: str, *args: str, stdin: str | None = None, **extra: str) -> Done:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "svc_identity", *args, cwd=ROOT, env=env(pg_dsn, **extra),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate((stdin or "").encode()), 60)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def stub(pg_dsn: str, redis_url: str) -> AsyncIterator[pb_grpc.IdentityServiceStub]:
    app = await create_server(Settings(
        grpc_port=0, postgres_dsn=pg_dsn, redis_url=redis_url, key_encryption_key=KEK,  # type: ignore[arg-type]
        redis_key_prefix=f"test:identity:{uuid.uuid4().hex[:8]}", key_cache_seconds=0,
        argon2_time_cost=1, argon2_memory_cost_kib=256, argon2_parallelism=1, log_json=False,
    ))
    await start(app)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield pb_grpc.IdentityServiceStub(channel)
    await app.stop(1.0)


async def role_after_login(stub: pb_grpc.IdentityServiceStub, email: str, password: str) -> str:
    reply = await stub.CreateSession(pb.CreateSessionRequest(email=email, password=password))
    return str(jwt.decode(reply.access_token, options={"verify_signature": False})["role"])


async def test_create_admin_creates_then_is_idempotent(
    stub: pb_grpc.IdentityServiceStub, pg_dsn: str
) -> None:
    email = f"boss-{uuid.uuid4().hex[:8]}@example.com"
    password = "admin password 123"
    done = await run(pg_dsn, "create-admin", "--email", email, "--display-name", "Boss",
               TP_ADMIN_PASSWORD=password)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("created admin: ")
    assert await role_after_login(stub, email, password) == "ADMIN"

    again = await run(pg_dsn, "create-admin", "--email", email.upper(), "--display-name", "Boss")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("already an admin: ")
    assert await role_after_login(stub, email, password) == "ADMIN"


async def test_create_admin_promotes_an_existing_account_only_when_told_and_takes_it_over(
        stub: pb_grpc.IdentityServiceStub, pg_dsn: str) -> None:
    """Sign-up proves no address: whoever signed up the admin-to-be's email first holds its
    password and sessions. create-admin refuses such an account unless --promote is given, and
    then gives it a new password and signs every session of it out."""
    email = f"ops-{uuid.uuid4().hex[:8]}@example.com"
    await stub.CreateUser(pb.CreateUserRequest(email=email, password="squatter pass 1", display_name="X"))
    squatter = await stub.CreateSession(pb.CreateSessionRequest(email=email, password="squatter pass 1"))
    refused = await run(pg_dsn, "create-admin", "--email", email, TP_ADMIN_PASSWORD="admin password 123")
    assert refused.returncode == 2 and "EXISTING_ACCOUNT" in refused.stderr
    assert await role_after_login(stub, email, "squatter pass 1") == "USER"

    done = await run(pg_dsn, "create-admin", "--email", email, "--promote",
                     TP_ADMIN_PASSWORD="admin password 123")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("promoted to admin: ")
    assert await role_after_login(stub, email, "admin password 123") == "ADMIN"
    with pytest.raises(grpc.aio.AioRpcError) as exc:  # the old password is gone
        await stub.CreateSession(pb.CreateSessionRequest(email=email, password="squatter pass 1"))
    assert error_info(exc.value).reason == "INVALID_CREDENTIALS"  # type: ignore[union-attr]
    with pytest.raises(grpc.aio.AioRpcError):  # and so is every session it had
        await stub.RefreshSession(pb.RefreshSessionRequest(refresh_token=squatter.refresh_token))


async def test_create_admin_refuses_bad_input(pg_dsn: str) -> None:
    short = await run(pg_dsn, "create-admin", "--email", "x@example.com", TP_ADMIN_PASSWORD="short")
    assert short.returncode == 2 and "PASSWORD_TOO_SHORT" in short.stderr
    no_password = await run(pg_dsn, "create-admin", "--email", "y@example.com", stdin="")
    assert no_password.returncode == 2 and "TP_ADMIN_PASSWORD" in no_password.stderr
    bad_email = await run(pg_dsn, "create-admin", "--email", "nope", TP_ADMIN_PASSWORD="long enough password")
    assert bad_email.returncode == 2 and "INVALID_EMAIL" in bad_email.stderr


async def test_ensure_user_is_idempotent_and_resets_the_password(
    stub: pb_grpc.IdentityServiceStub, pg_dsn: str
) -> None:
    email = f"demo-{uuid.uuid4().hex[:8]}@example.com"
    args = ("ensure-user", "--email", email, "--display-name", "Demo Fan", "--role", "USER")
    first = await run(pg_dsn, *args, TP_USER_PASSWORD="demo password 1")
    assert first.returncode == 0 and first.stdout.startswith("created: "), first.stderr
    second = await run(pg_dsn, *args, TP_USER_PASSWORD="demo password 1")
    assert second.returncode == 0 and second.stdout.startswith("unchanged: "), second.stderr
    assert await role_after_login(stub, email, "demo password 1") == "USER"

    changed = await run(pg_dsn, "ensure-user", "--email", email, "--display-name", "Demo Fan",
                        "--role", "ADMIN", "--password-env", "DEMO_PW", DEMO_PW="demo password 2")
    assert changed.returncode == 0 and changed.stdout.startswith("updated: "), changed.stderr
    assert await role_after_login(stub, email, "demo password 2") == "ADMIN"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.CreateSession(pb.CreateSessionRequest(email=email, password="demo password 1"))
    assert error_info(exc.value).reason == "INVALID_CREDENTIALS"  # type: ignore[union-attr]

    missing = await run(pg_dsn, *args)
    assert missing.returncode == 2 and "TP_USER_PASSWORD" in missing.stderr


async def test_rotate_keys_command(stub: pb_grpc.IdentityServiceStub, pg_dsn: str) -> None:
    before = [k.kid for k in (await stub.GetSigningKeys(pb.GetSigningKeysRequest())).keys]
    early = await run(pg_dsn, "rotate-keys")  # the default publish-ahead (120 s) has not passed yet
    assert early.returncode == 3 and "too early" in early.stderr
    done = await run(pg_dsn, "rotate-keys", TP_KEY_PUBLISH_AHEAD_SECONDS="0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"rotated: current={before[1]} ")
    after = [k.kid for k in (await stub.GetSigningKeys(pb.GetSigningKeysRequest())).keys]
    assert after[0] == before[1] and before[0] in after and len(after) == 3


async def test_python_m_svc_identity_serves_by_default(pg_dsn: str, redis_url: str) -> None:
    import signal
    import socket

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "svc_identity", cwd=ROOT,
        env=env(pg_dsn, TP_GRPC_PORT=str(port), TP_REDIS_URL=redis_url, TP_SHUTDOWN_GRACE_SECONDS="2"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="ticketping.identity.v1.IdentityService"))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            keys = await pb_grpc.IdentityServiceStub(channel).GetSigningKeys(pb.GetSigningKeysRequest())
            assert len(keys.keys) >= 2
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
