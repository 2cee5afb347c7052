"""svc_identity in process over gRPC, with real PostgreSQL and Redis.

What fans and admins care about: one account per email whatever its case and however many
sign-ups race; a login error that says nothing about which part was wrong; access tokens that the
edge can verify with the published keys and that name the right user and role; a stolen refresh
token that becomes useless (and takes its whole session down) once used twice; password guessing
that gets slowed down, but never locks anyone out for good.
"""

from __future__ import annotations

import asyncio
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import jwt
import psycopg
import pytest
import pytest_asyncio
from ticketping.identity.v1 import identity_service_pb2 as pb
from ticketping.identity.v1 import identity_service_pb2_grpc as pb_grpc

from meshkit.errors import error_info
from meshkit.server import App, start
from svc_identity.bootstrap import create_server
from svc_identity.config import Settings

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"
FAST_ARGON2: dict[str, Any] = {"argon2_time_cost": 1, "argon2_memory_cost_kib": 256, "argon2_parallelism": 1}


def settings(pg_dsn: str, redis_url: str, **over: Any) -> Settings:
    base: dict[str, Any] = {
        "grpc_port": 0,
        "postgres_dsn": pg_dsn,
        "redis_url": redis_url,
        "redis_key_prefix": f"test:identity:{uuid.uuid4().hex[:8]}",
        "key_encryption_key": "x" * 43,  # 32 bytes of base64url
        "key_publish_ahead_seconds": 0,
        "key_cache_seconds": 0,
        "log_json": False,
        **FAST_ARGON2,
    }
    base.update(over)
    return Settings(**base)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def app(pg_dsn: str, redis_url: str) -> AsyncIterator[App]:
    a = await create_server(settings(pg_dsn, redis_url))
    await start(a)
    yield a
    await a.stop(1.0)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def stub(app: App) -> AsyncIterator[pb_grpc.IdentityServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield pb_grpc.IdentityServiceStub(channel)


def email(tag: str = "fan") -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@example.com"


def as_user(user_id: str, role: str = "USER") -> tuple[tuple[str, str], ...]:
    return (("x-user-id", user_id), ("x-user-role", role))


async def fails(call: Any, code: grpc.StatusCode, reason: str) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    assert exc.value.code() == code, exc.value.details()
    info = error_info(exc.value)
    assert info is not None and info.reason == reason, info
    return exc.value


async def sign_up_and_log_in(
    stub: pb_grpc.IdentityServiceStub, address: str | None = None
) -> tuple[pb.User, pb.CreateSessionResponse]:
    address = address or email()
    user = await stub.CreateUser(pb.CreateUserRequest(email=address, password=PASSWORD, display_name="Fan"))
    session = await stub.CreateSession(pb.CreateSessionRequest(email=address, password=PASSWORD))
    return user, session


async def signing_jwks(stub: pb_grpc.IdentityServiceStub) -> dict[str, Any]:
    reply = await stub.GetSigningKeys(pb.GetSigningKeysRequest())
    return {"keys": [{f: getattr(k, f) for f in ("kty", "crv", "x", "y", "kid", "use", "alg")}
                     for k in reply.keys]}


def verify(token: str, jwks: dict[str, Any]) -> dict[str, Any]:
    kid = jwt.get_unverified_header(token)["kid"]
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == kid]
    key = jwt.PyJWK.from_dict(jwk)
    return jwt.decode(token, key, algorithms=["ES256"], audience="ticketping",
                      issuer="ticketping-identity", options={"require": ["exp", "iat", "sub", "jti"]})


# -- sign up, log in, me ---------------------------------------------------------------------------


async def test_sign_up_log_in_and_me(stub: pb_grpc.IdentityServiceStub) -> None:
    address = email()
    user = await stub.CreateUser(
        pb.CreateUserRequest(email=address, password=PASSWORD, display_name="Min-ji")
    )
    assert user.name == f"users/{user.id}" and user.email == address
    assert user.role == pb.ROLE_USER and user.display_name == "Min-ji"

    session = await stub.CreateSession(pb.CreateSessionRequest(email=address.upper(), password=PASSWORD))
    assert session.token_type == "Bearer" and session.user == user.name
    assert 0 < session.expires_in <= 900
    claims = verify(session.access_token, await signing_jwks(stub))
    assert claims["sub"] == user.id and claims["role"] == "USER"

    me = await stub.GetUser(pb.GetUserRequest(name="users/me"), metadata=as_user(claims["sub"]))
    assert (me.id, me.email, me.display_name, me.role) == (user.id, address, "Min-ji", pb.ROLE_USER)


async def test_an_address_typed_with_combining_accents_logs_in(stub: pb_grpc.IdentityServiceStub) -> None:
    """Sign-up stores the NFC form; log-in compares the same form, whichever the keyboard sent."""
    decomposed = f"jose\u0301-{uuid.uuid4().hex[:8]}@example.com"
    await stub.CreateUser(pb.CreateUserRequest(email=decomposed, password=PASSWORD, display_name="J"))
    for typed in (decomposed, unicodedata.normalize("NFC", decomposed)):
        session = await stub.CreateSession(pb.CreateSessionRequest(email=typed, password=PASSWORD))
        assert session.access_token


async def test_me_needs_an_identity(stub: pb_grpc.IdentityServiceStub) -> None:
    await fails(stub.GetUser(pb.GetUserRequest(name="users/me")), grpc.StatusCode.UNAUTHENTICATED,
                "UNAUTHENTICATED")
    await fails(stub.GetUser(pb.GetUserRequest(name="users/me"), metadata=as_user("not-a-uuid")),
                grpc.StatusCode.UNAUTHENTICATED, "INVALID_IDENTITY")


async def test_another_users_profile_needs_admin(stub: pb_grpc.IdentityServiceStub) -> None:
    fan, _ = await sign_up_and_log_in(stub)
    other, _ = await sign_up_and_log_in(stub)
    await fails(stub.GetUser(pb.GetUserRequest(name=other.name), metadata=as_user(fan.id)),
                grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
    # a fan naming themselves by id is fine
    assert (await stub.GetUser(pb.GetUserRequest(name=fan.name), metadata=as_user(fan.id))).id == fan.id
    admin_id = str(uuid.uuid4())
    seen = await stub.GetUser(pb.GetUserRequest(name=other.name), metadata=as_user(admin_id, "ADMIN"))
    assert seen.id == other.id
    await fails(stub.GetUser(pb.GetUserRequest(name=f"users/{uuid.uuid4()}"),
                             metadata=as_user(admin_id, "ADMIN")),
                grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
    await fails(stub.GetUser(pb.GetUserRequest(name="events/1"), metadata=as_user(fan.id)),
                grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME")


@pytest.mark.parametrize(
    ("address", "password", "reason"),
    [
        ("not-an-email", PASSWORD, "INVALID_EMAIL"),
        ("a@b", PASSWORD, "INVALID_EMAIL"),
        ("two@@example.com", PASSWORD, "INVALID_EMAIL"),
        ("", PASSWORD, "INVALID_EMAIL"),
        ("ok@example.com", "short", "PASSWORD_TOO_SHORT"),
        ("ok@example.com", "123456789", "PASSWORD_TOO_SHORT"),
        ("ok@example.com", "x" * 5000, "PASSWORD_TOO_LONG"),
    ],
)
async def test_bad_sign_up_is_refused_with_its_reason(
    stub: pb_grpc.IdentityServiceStub, address: str, password: str, reason: str
) -> None:
    await fails(stub.CreateUser(pb.CreateUserRequest(email=address, password=password)),
                grpc.StatusCode.INVALID_ARGUMENT, reason)


async def test_email_is_unique_whatever_its_case(stub: pb_grpc.IdentityServiceStub) -> None:
    address = email("Case")
    await stub.CreateUser(pb.CreateUserRequest(email=address, password=PASSWORD))
    await fails(stub.CreateUser(pb.CreateUserRequest(email=f"  {address.upper()} ", password=PASSWORD)),
                grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN")


async def test_hundred_concurrent_sign_ups_make_one_account(
    stub: pb_grpc.IdentityServiceStub, pg_dsn: str
) -> None:
    address = email("race")
    spellings = [address if i % 2 else address.upper() for i in range(100)]
    results = await asyncio.gather(
        *(stub.CreateUser(pb.CreateUserRequest(email=e, password=PASSWORD)) for e in spellings),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, pb.User)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1 and len(refused) == 99
    assert all(r.code() == grpc.StatusCode.ALREADY_EXISTS for r in refused)
    with psycopg.connect(pg_dsn) as conn:
        (count,) = conn.execute("SELECT count(*) FROM users WHERE lower(email) = lower(%s)",
                                (address,)).fetchone()  # type: ignore[misc]
    assert count == 1


async def test_password_is_stored_as_argon2id(stub: pb_grpc.IdentityServiceStub, pg_dsn: str) -> None:
    user, _ = await sign_up_and_log_in(stub)
    with psycopg.connect(pg_dsn) as conn:
        (stored,) = conn.execute("SELECT password_hash FROM users WHERE id = %s",
                                 (user.id,)).fetchone()  # type: ignore[misc]
    assert stored.startswith("$argon2id$") and PASSWORD not in stored


async def test_unknown_email_and_wrong_password_look_the_same(stub: pb_grpc.IdentityServiceStub) -> None:
    user, _ = await sign_up_and_log_in(stub)
    wrong = await fails(stub.CreateSession(pb.CreateSessionRequest(email=user.email, password="x" * 12)),
                        grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    unknown = await fails(stub.CreateSession(pb.CreateSessionRequest(email=email(), password="x" * 12)),
                          grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    assert wrong.details() == unknown.details()
    assert error_info(wrong) == error_info(unknown)


# -- access tokens ----------------------------------------------------------------------------------


async def test_access_token_claims_and_header(stub: pb_grpc.IdentityServiceStub) -> None:
    user, session = await sign_up_and_log_in(stub)
    header = jwt.get_unverified_header(session.access_token)
    assert header["alg"] == "ES256" and header["kid"]
    jwks = await signing_jwks(stub)
    assert header["kid"] in {k["kid"] for k in jwks["keys"]}
    for k in jwks["keys"]:
        assert (k["kty"], k["crv"], k["use"], k["alg"]) == ("EC", "P-256", "sig", "ES256")
    claims = verify(session.access_token, jwks)
    assert claims["iss"] == "ticketping-identity" and claims["aud"] == "ticketping"
    assert claims["sub"] == user.id and claims["role"] == "USER" and claims["jti"]
    assert 0 < claims["exp"] - claims["iat"] <= 900
    assert abs(claims["iat"] - time.time()) < 30
    # the same token does not verify for another audience, nor with a tampered payload
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(session.access_token, jwt.PyJWK.from_dict(jwks["keys"][0]), algorithms=["ES256"],
                   audience="someone-else")
    head, body, sig = session.access_token.split(".")
    with pytest.raises(jwt.InvalidSignatureError):
        verify(f"{head}.{body[:-2]}{'AA' if body[-2:] != 'AA' else 'BB'}.{sig}", jwks)


async def test_public_jwks_carries_identity_keys(stub: pb_grpc.IdentityServiceStub) -> None:
    own = await signing_jwks(stub)
    call = stub.GetJwks(pb.GetJwksRequest())
    public = await call
    assert {k.kid for k in public.keys} >= {k["kid"] for k in own["keys"]}
    assert ("cache-control", "public, max-age=30") in tuple(await call.initial_metadata())


# -- refresh tokens ---------------------------------------------------------------------------------


async def test_refresh_rotates_and_reuse_revokes_the_family(
    stub: pb_grpc.IdentityServiceStub, pg_dsn: str
) -> None:
    user, first = await sign_up_and_log_in(stub)
    assert len(first.refresh_token) >= 43  # 256 bits, base64url
    second = await stub.RefreshSession(pb.RefreshSessionRequest(refresh_token=first.refresh_token))
    assert second.refresh_token != first.refresh_token and second.user == user.name
    assert verify(second.access_token, await signing_jwks(stub))["sub"] == user.id
    third = await stub.RefreshSession(pb.RefreshSessionRequest(refresh_token=second.refresh_token))

    # the first token is replayed (stolen): 401, and every token of its family dies
    await fails(stub.RefreshSession(pb.RefreshSessionRequest(refresh_token=first.refresh_token)),
                grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_REUSED")
    await fails(stub.RefreshSession(pb.RefreshSessionRequest(refresh_token=third.refresh_token)),
                grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_REVOKED")

    # only hashes are stored; another login (another family) is untouched
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT t.token_hash, t.revoked_at IS NOT NULL FROM refresh_tokens t "
            "JOIN refresh_families f ON f.id = t.family_id WHERE f.user_id = %s", (user.id,)
        ).fetchall()
    assert len(rows) == 3 and all(revoked for _, revoked in rows)
    assert all(len(h) == 32 for h, _ in rows)
    other = await stub.CreateSession(pb.CreateSessionRequest(email=user.email, password=PASSWORD))
    fresh = await stub.RefreshSession(pb.RefreshSessionRequest(refresh_token=other.refresh_token))
    assert fresh.access_token


async def test_concurrent_double_refresh_has_exactly_one_winner(stub: pb_grpc.IdentityServiceStub) -> None:
    for _ in range(5):
        _, session = await sign_up_and_log_in(stub)
        results = await asyncio.gather(
            *(stub.RefreshSession(pb.RefreshSessionRequest(refresh_token=session.refresh_token))
              for _ in range(2)),
            return_exceptions=True,
        )
        ok = [r for r in results if isinstance(r, pb.RefreshSessionResponse)]
        errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(ok) == 1 and len(errors) == 1
        assert errors[0].code() == grpc.StatusCode.UNAUTHENTICATED


async def test_bad_refresh_tokens_are_401(stub: pb_grpc.IdentityServiceStub) -> None:
    for token in ("garbage", "A" * 43, "é" * 43):
        await fails(stub.RefreshSession(pb.RefreshSessionRequest(refresh_token=token)),
                    grpc.StatusCode.UNAUTHENTICATED, "INVALID_REFRESH_TOKEN")
    await fails(stub.RefreshSession(pb.RefreshSessionRequest()), grpc.StatusCode.INVALID_ARGUMENT,
                "REFRESH_TOKEN_REQUIRED")


async def test_expired_refresh_token_is_401(stub: pb_grpc.IdentityServiceStub, pg_dsn: str) -> None:
    user, session = await sign_up_and_log_in(stub)
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("UPDATE refresh_tokens SET expires_at = now() - interval '1 second' "
                     "WHERE family_id IN (SELECT id FROM refresh_families WHERE user_id = %s)", (user.id,))
    await fails(stub.RefreshSession(pb.RefreshSessionRequest(refresh_token=session.refresh_token)),
                grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_EXPIRED")


async def test_log_out_revokes_the_family_of_the_callers_token_only(
    stub: pb_grpc.IdentityServiceStub,
) -> None:
    user, session = await sign_up_and_log_in(stub)
    other, other_session = await sign_up_and_log_in(stub)
    revoke = pb.RevokeSessionRequest(refresh_token=session.refresh_token)
    await fails(stub.RevokeSession(revoke), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    await fails(stub.RevokeSession(revoke, metadata=as_user(other.id)),
                grpc.StatusCode.PERMISSION_DENIED, "REFRESH_TOKEN_NOT_OWNED")
    # the failed attempt by someone else changed nothing
    rotated = await stub.RefreshSession(pb.RefreshSessionRequest(refresh_token=session.refresh_token))

    # logging out with the spent token still ends the family (its newest token too); twice is fine
    await stub.RevokeSession(revoke, metadata=as_user(user.id))
    await stub.RevokeSession(revoke, metadata=as_user(user.id))
    await fails(stub.RefreshSession(pb.RefreshSessionRequest(refresh_token=rotated.refresh_token)),
                grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_REVOKED")
    # the other user's session is alive
    await stub.RefreshSession(pb.RefreshSessionRequest(refresh_token=other_session.refresh_token))


# -- throttling -------------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def strict_stub(pg_dsn: str, redis_url: str) -> AsyncIterator[pb_grpc.IdentityServiceStub]:
    """A replica with a tiny threshold and short blocks."""
    a = await create_server(settings(
        pg_dsn, redis_url,
        login_max_failures_per_account=3, login_max_failures_per_client=6,
        login_failure_window_seconds=3, login_backoff_base_seconds=1.0, login_backoff_max_seconds=2.0,
    ))
    await start(a)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as channel:
        yield pb_grpc.IdentityServiceStub(channel)
    await a.stop(1.0)


def from_address(ip: str) -> tuple[tuple[str, str], ...]:
    # What the edge forwards: whatever the client claimed first, the address it saw last.
    return (("x-forwarded-for", f"10.0.0.1, {ip}"),)


async def test_failed_logins_per_account_are_slowed_down_then_forgotten(
    strict_stub: pb_grpc.IdentityServiceStub,
) -> None:
    stub = strict_stub
    address = email("guess")
    await stub.CreateUser(pb.CreateUserRequest(email=address, password=PASSWORD))
    wrong = pb.CreateSessionRequest(email=address, password="wrong password")
    for i in range(3):  # from three addresses, so only the account counter can trip
        await fails(stub.CreateSession(wrong, metadata=from_address(f"198.51.100.{i}")),
                    grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    # blocked now, even with the right password, and whatever the spelling of the address
    right = pb.CreateSessionRequest(email=address.upper(), password=PASSWORD)
    err = await fails(stub.CreateSession(right, metadata=from_address("198.51.100.9")),
                      grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_ATTEMPTS")
    info = error_info(err)
    assert info is not None and 1 <= int(info.metadata["retry_after_seconds"]) <= 2
    # the block ends on its own
    await asyncio.sleep(1.2)
    ok = await stub.CreateSession(right, metadata=from_address("198.51.100.9"))
    assert ok.access_token
    # a success cleared the account's count: three fresh failures are allowed again
    for i in range(2):
        await fails(stub.CreateSession(wrong, metadata=from_address(f"198.51.100.{20 + i}")),
                    grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    assert (await stub.CreateSession(right, metadata=from_address("198.51.100.30"))).access_token


async def test_a_burst_of_parallel_guesses_gets_no_more_password_checks_than_allowed(
    strict_stub: pb_grpc.IdentityServiceStub,
) -> None:
    """30 guesses at one account at once, from 30 addresses: only the 3 failures the account has
    before a block get their password checked; the others are refused without a check."""
    address = email("burst")
    await strict_stub.CreateUser(pb.CreateUserRequest(email=address, password=PASSWORD))

    async def guess(i: int) -> str:
        try:
            await strict_stub.CreateSession(pb.CreateSessionRequest(email=address, password=f"guess {i} pw"),
                                            metadata=from_address(f"198.51.100.{100 + i}"))
        except grpc.aio.AioRpcError as err:
            info = error_info(err)
            assert info is not None
            return info.reason
        return "LOGGED_IN"

    reasons = await asyncio.gather(*(guess(i) for i in range(30)))
    assert reasons.count("INVALID_CREDENTIALS") == 3, reasons
    assert reasons.count("TOO_MANY_ATTEMPTS") == 27


async def test_backoff_grows_and_is_capped(strict_stub: pb_grpc.IdentityServiceStub) -> None:
    stub = strict_stub
    address = email("grow")  # unknown account: counted the same way (no hint that it does not exist)
    wrong = pb.CreateSessionRequest(email=address, password="wrong password")
    waits = []
    for i in range(5):
        meta = from_address(f"203.0.113.{i}")
        while True:
            try:
                await stub.CreateSession(wrong, metadata=meta)
            except grpc.aio.AioRpcError as err:
                info = error_info(err)
                assert info is not None
                if info.reason == "TOO_MANY_ATTEMPTS":
                    waits.append(int(info.metadata["retry_after_seconds"]))
                    await asyncio.sleep(float(info.metadata["retry_after_seconds"]))
                    continue
                assert info.reason == "INVALID_CREDENTIALS"
                break
    assert waits and max(waits) <= 2  # capped at login_backoff_max_seconds


async def test_failed_logins_per_client_are_slowed_down(strict_stub: pb_grpc.IdentityServiceStub) -> None:
    stub = strict_stub
    meta = from_address("192.0.2.77")
    for _ in range(6):  # six different accounts from one address
        await fails(stub.CreateSession(pb.CreateSessionRequest(email=email(), password="wrong password"),
                                       metadata=meta),
                    grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    await fails(stub.CreateSession(pb.CreateSessionRequest(email=email(), password="wrong password"),
                                   metadata=meta),
                grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_ATTEMPTS")
    # another client is not affected
    await fails(stub.CreateSession(pb.CreateSessionRequest(email=email(), password="wrong password"),
                                   metadata=from_address("192.0.2.78")),
                grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")


async def test_the_database_itself_refuses_a_differently_cased_email(
    stub: pb_grpc.IdentityServiceStub, pg_dsn: str
) -> None:
    user, _ = await sign_up_and_log_in(stub)
    with psycopg.connect(pg_dsn) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO users (id, email, display_name, password_hash) VALUES (%s, %s, 'x', 'x')",
            (uuid.uuid4(), user.email.upper()),
        )
