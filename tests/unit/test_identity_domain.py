"""svc_identity's rules without I/O: emails, passwords, callers, token claims, refresh-token
verdicts, the signing-key lifecycle, login throttling, and the key encryption helpers."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from pydantic import ValidationError

from meshkit.errors import InvalidArgument, Unauthenticated
from svc_identity.adapters.keystore import KeyStoreError, new_key, public_jwk, seal, unseal
from svc_identity.config import Settings, decode_kek
from svc_identity.domain import keys as k
from svc_identity.domain import tokens as t
from svc_identity.domain.throttle import ThrottlePolicy, TooManyAttempts, client_address
from svc_identity.domain.users import (
    Role,
    caller_from_headers,
    check_password,
    email_fingerprint,
    normalize_display_name,
    normalize_email,
    parse_user_name,
)

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)

# -- emails, passwords, names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("  Min.Ji+tickets@Example.COM ", "Min.Ji+tickets@example.com"),
        ("o'brien@mail.example.co.kr", "o'brien@mail.example.co.kr"),
        ("민지@예시.한국", "민지@예시.한국"),
        ("a@b.io", "a@b.io"),
    ],
)
def test_good_emails_are_normalised(raw: str, stored: str) -> None:
    assert normalize_email(raw) == stored


@pytest.mark.parametrize(
    "raw",
    ["", "   ", "plain", "@example.com", "me@", "me@localhost", "a@@b.com", "a b@example.com",
     ".me@example.com", "me.@example.com", "m..e@example.com", "me@-example.com", "me@example..com",
     "me@example.123", "me@[127.0.0.1]", '"quoted"@example.com', "me@exa_mple.com",
     "x" * 65 + "@example.com", "me@" + "a" * 250 + ".com", "me\x00@example.com"],
)
def test_bad_emails_are_refused(raw: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        normalize_email(raw)
    assert exc.value.reason == "INVALID_EMAIL"


def test_case_does_not_make_another_account() -> None:
    assert email_fingerprint("Fan@Example.com") == email_fingerprint(" fan@example.COM")
    assert email_fingerprint("fan@example.com") != email_fingerprint("fan2@example.com")


def test_password_policy() -> None:
    check_password("x" * 10, max_length=1024)
    check_password("가" * 10, max_length=1024)  # characters, not bytes
    for bad, reason in (("", "PASSWORD_TOO_SHORT"), ("x" * 9, "PASSWORD_TOO_SHORT"),
                        ("x" * 1025, "PASSWORD_TOO_LONG")):
        with pytest.raises(InvalidArgument) as exc:
            check_password(bad, max_length=1024)
        assert exc.value.reason == reason


def test_display_name() -> None:
    assert normalize_display_name("  Min-ji ", "m@example.com") == "Min-ji"
    assert normalize_display_name("", "minji@example.com") == "minji"
    for bad in ("x" * 101, "bell\x07"):
        with pytest.raises(InvalidArgument):
            normalize_display_name(bad, "m@example.com")


def test_user_names_and_callers() -> None:
    assert parse_user_name("users/me") == "me"
    assert parse_user_name("users/abc") == "abc"
    for bad in ("", "users/", "user/me", "users/a/b", "events/1"):
        with pytest.raises(InvalidArgument):
            parse_user_name(bad)
    uid = uuid.uuid4()
    assert caller_from_headers(None, "ADMIN") is None
    admin = caller_from_headers(str(uid), "ADMIN")
    assert admin is not None and admin.user_id == uid and admin.is_admin
    odd = caller_from_headers(str(uid), "ROOT")
    assert odd is not None and odd.role is Role.USER  # unknown role: least privilege
    with pytest.raises(Unauthenticated):
        caller_from_headers("admin-1", "ADMIN")


# -- tokens ----------------------------------------------------------------------------------------


def test_access_claims() -> None:
    uid = uuid.uuid4()
    c = t.access_claims(user_id=uid, role=Role.ADMIN, now=NOW, ttl_seconds=900, issuer="iss", audience="aud")
    d = c.as_dict()
    assert set(d) == {"iss", "aud", "sub", "role", "iat", "exp", "jti"}
    assert (d["sub"], d["role"], d["iss"], d["aud"]) == (str(uid), "ADMIN", "iss", "aud")
    assert d["exp"] == d["iat"] + 900 == int(NOW.timestamp()) + 900
    other = t.access_claims(user_id=uid, role=Role.USER, now=NOW, ttl_seconds=60, issuer="i", audience="a")
    assert other.jti != c.jti
    with pytest.raises(ValueError):
        t.access_claims(user_id=uid, role=Role.USER, now=NOW, ttl_seconds=901, issuer="i", audience="a")


def test_refresh_tokens_are_256_bit_and_only_their_hash_is_kept() -> None:
    tokens = {t.new_refresh_token() for _ in range(100)}
    assert len(tokens) == 100
    for tok in tokens:
        assert len(tok) == 43 and set(tok) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        digest = t.refresh_token_hash(tok)
        assert digest is not None and len(digest) == 32 and tok.encode() not in digest
    for bad in ("", "short", "A" * 42, "A" * 44, "!" * 43, "é" * 43):
        assert t.refresh_token_hash(bad) is None


def _stored(**over: object) -> t.StoredRefreshToken:
    base: dict[str, object] = {
        "family_id": uuid.uuid4(), "user_id": uuid.uuid4(), "user_role": Role.USER,
        "expires_at": NOW + timedelta(days=1), "used_at": None, "revoked_at": None,
        "family_revoked_at": None,
    }
    base.update(over)
    return t.StoredRefreshToken(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("stored", "verdict", "reason"),
    [
        (None, t.RefreshVerdict.UNKNOWN, "INVALID_REFRESH_TOKEN"),
        (_stored(), t.RefreshVerdict.ROTATE, None),
        (_stored(used_at=NOW), t.RefreshVerdict.REUSED, "REFRESH_TOKEN_REUSED"),
        (_stored(expires_at=NOW), t.RefreshVerdict.EXPIRED, "REFRESH_TOKEN_EXPIRED"),
        (_stored(revoked_at=NOW, used_at=NOW), t.RefreshVerdict.REVOKED, "REFRESH_TOKEN_REVOKED"),
        (_stored(family_revoked_at=NOW), t.RefreshVerdict.REVOKED, "REFRESH_TOKEN_REVOKED"),
        # a spent token of an expired session is still a reuse (its family must die)
        (_stored(used_at=NOW, expires_at=NOW - timedelta(days=1)), t.RefreshVerdict.REUSED,
         "REFRESH_TOKEN_REUSED"),
    ],
)
def test_refresh_verdicts(stored: t.StoredRefreshToken | None, verdict: t.RefreshVerdict,
                          reason: str | None) -> None:
    assert t.judge_refresh(stored, NOW) is verdict
    if reason:
        err = t.refresh_error(verdict)
        assert err.code == grpc.StatusCode.UNAUTHENTICATED and err.reason == reason


# -- signing-key lifecycle ---------------------------------------------------------------------------

POLICY = k.KeyPolicy(publish_ahead=timedelta(seconds=120), access_ttl=timedelta(minutes=15),
                     clock_skew=timedelta(seconds=60), key_cache=timedelta(seconds=10))


def key(kid: str, state: k.KeyState, created: timedelta, activated: timedelta | None = None,
        retired: timedelta | None = None) -> k.KeyInfo:
    return k.KeyInfo(kid, state, NOW - created, None if activated is None else NOW - activated,
                     None if retired is None else NOW - retired)


def test_a_fresh_install_gets_a_current_and_a_next_key() -> None:
    plan = k.plan_ensure([], NOW, POLICY)
    assert plan.create_current and plan.create_next and not plan.promote


def test_ensure_fills_what_is_missing_only() -> None:
    cur = key("c", k.KeyState.CURRENT, timedelta(days=1), timedelta(days=1))
    nxt = key("n", k.KeyState.NEXT, timedelta(seconds=5))
    assert k.plan_ensure([cur, nxt], NOW, POLICY).empty
    assert k.plan_ensure([cur], NOW, POLICY) == k.Plan(create_next=True)
    lone = k.plan_ensure([nxt], NOW, POLICY)
    assert lone.promote == "n" and lone.create_next and lone.notes


def test_rotation_waits_for_the_next_key_to_be_published_long_enough() -> None:
    cur = key("c", k.KeyState.CURRENT, timedelta(days=1), timedelta(days=1))
    young = key("n", k.KeyState.NEXT, timedelta(seconds=30))
    with pytest.raises(k.RotationTooEarly) as exc:
        k.plan_rotation([cur, young], NOW, POLICY)
    assert exc.value.wait == timedelta(seconds=90)
    old_enough = key("n", k.KeyState.NEXT, timedelta(seconds=120))
    plan = k.plan_rotation([cur, old_enough], NOW, POLICY)
    assert (plan.retire, plan.promote, plan.create_next) == ("c", "n", True)


def test_retired_keys_stay_published_until_their_tokens_expired() -> None:
    cur = key("c", k.KeyState.CURRENT, timedelta(hours=1), timedelta(minutes=2))
    nxt = key("n", k.KeyState.NEXT, timedelta(minutes=2))
    retention = POLICY.access_ttl + POLICY.clock_skew + POLICY.key_cache
    keep = key("r1", k.KeyState.RETIRED, timedelta(days=1), timedelta(days=1),
               retired=retention - timedelta(seconds=1))
    gone = key("r2", k.KeyState.RETIRED, timedelta(days=2), timedelta(days=2), retired=retention)
    kids = [x.kid for x in k.published([gone, keep, nxt, cur], NOW, POLICY)]
    assert kids == ["c", "n", "r1"]
    assert k.plan_maintenance([gone, keep, nxt, cur], NOW, POLICY, None) == k.Plan(delete=("r2",))


def test_automatic_rotation_is_due_only_after_the_interval() -> None:
    nxt = key("n", k.KeyState.NEXT, timedelta(hours=1))
    fresh = key("c", k.KeyState.CURRENT, timedelta(hours=2), activated=timedelta(minutes=30))
    assert k.plan_maintenance([fresh, nxt], NOW, POLICY, timedelta(hours=1)).empty
    due = key("c", k.KeyState.CURRENT, timedelta(hours=2), activated=timedelta(hours=1))
    plan = k.plan_maintenance([due, nxt], NOW, POLICY, timedelta(hours=1))
    assert (plan.retire, plan.promote) == ("c", "n")
    young_next = key("n", k.KeyState.NEXT, timedelta(seconds=10))
    assert k.plan_maintenance([due, young_next], NOW, POLICY, timedelta(hours=1)).empty  # later


# -- throttling ----------------------------------------------------------------------------------------


def test_backoff_grows_then_is_capped() -> None:
    p = ThrottlePolicy(threshold=5, window_seconds=900, backoff_base_seconds=30, backoff_max_seconds=900)
    assert [p.block_seconds(n) for n in range(1, 12)] == [0, 0, 0, 0, 30, 60, 120, 240, 480, 900, 900]
    assert p.block_seconds(10_000) == 900


def test_too_many_attempts_says_when_to_retry() -> None:
    err = TooManyAttempts(1.2)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "TOO_MANY_ATTEMPTS"
    assert err.metadata == {"retry_after_seconds": "2"}


@pytest.mark.parametrize(
    ("xff", "peer", "client"),
    [
        # The edge appends the address it accepted the connection from; earlier entries are
        # whatever the client sent, never trusted.
        ("198.51.100.9, 203.0.113.7", "ipv4:127.0.0.1:5000", "203.0.113.7"),
        (" 203.0.113.7 ", None, "203.0.113.7"),
        ("203.0.113.7:4444", None, "203.0.113.7"),
        ("10.0.0.1, [2001:db8:0:0::1]:443", None, "2001:db8::1"),
        ("2001:DB8::1", None, "2001:db8::1"),
        (None, "ipv4:192.0.2.1:5555", "192.0.2.1"),
        ("", "ipv6:[::1]:5555", "::1"),
        (None, None, "unknown"),
    ],
)
def test_client_address(xff: str | None, peer: str | None, client: str) -> None:
    assert client_address(xff, peer) == client


# -- settings and key encryption --------------------------------------------------------------------


def _settings(**over: object) -> Settings:
    return Settings(postgres_dsn="postgresql://x/y", redis_url="redis://x", **over)  # type: ignore[arg-type]


def test_settings_defaults_and_limits() -> None:
    s = _settings()
    assert (s.jwt_issuer, s.jwt_audience) == ("ticketping-identity", "ticketping")
    assert s.access_token_ttl_seconds == 900
    assert s.key_publish_ahead_seconds == 120 and s.kek is None
    # OWASP's argon2id configuration: m=19 MiB, t=2, p=1
    assert (s.argon2_time_cost, s.argon2_memory_cost_kib, s.argon2_parallelism) == (2, 19456, 1)
    with pytest.raises(ValidationError):
        _settings(access_token_ttl_seconds=901)
    with pytest.raises(ValidationError):
        _settings(key_encryption_key="too-short")


def test_kek_accepts_base64_and_base64url() -> None:
    raw = bytes(range(32))

    assert decode_kek(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw
    assert decode_kek(base64.b64encode(raw).decode()) == raw
    assert _settings(key_encryption_key=base64.b64encode(raw).decode()).kek == raw
    with pytest.raises(ValueError):
        decode_kek(base64.b64encode(bytes(16)).decode())


def test_private_keys_are_sealed_to_their_kid() -> None:
    kek = bytes(range(32))
    jwk, blob, encryption = new_key(kek)
    assert encryption == "aes256gcm" and b"PRIVATE KEY" not in blob
    assert b"PRIVATE KEY" in unseal(blob, encryption, jwk["kid"], kek)
    with pytest.raises(KeyStoreError):
        unseal(blob, encryption, "another-kid", kek)  # the kid is associated data
    with pytest.raises(KeyStoreError):
        unseal(blob, encryption, jwk["kid"], bytes(32))
    with pytest.raises(KeyStoreError):
        unseal(blob, encryption, jwk["kid"], None)
    plain, enc = seal(b"pem", "kid", None)
    assert (plain, enc) == (b"pem", "none")


def test_jwk_shape_and_thumbprint_kid() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    jwk = public_jwk(private.public_key())
    assert set(jwk) == {"kty", "crv", "x", "y", "kid", "use", "alg"}
    assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"]) == ("EC", "P-256", "sig", "ES256")
    assert len(jwk["x"]) == len(jwk["y"]) == 43 and len(jwk["kid"]) == 43
    assert public_jwk(private.public_key()) == jwk  # deterministic (RFC 7638 thumbprint)
