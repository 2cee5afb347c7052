"""Identity through the edge: accounts, tokens, the edge's JWT checks and the admin role."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import time
import urllib.request
import uuid
from datetime import timedelta

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from devstack.components import local_key
from devstack.layout import Layout

from .conftest import Fan, identity_command, log_in, new_email, sign_up

pytestmark = pytest.mark.e2e


def started(lay: Layout, service: str, method: str) -> float:
    """How many calls of `method` reached `service` (its own Prometheus counter)."""
    port = lay.service(service).metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf'grpc_server_started_total{{grpc_method="{method}",[^}}]*}} ([\d.e+]+)', text)
    return float(m.group(1)) if m else 0.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def _sign_with_identity_key(lay: Layout, claims: dict) -> str:
    """A token signed by identity's real current key, with claims of the test's choosing."""
    from meshkit.db import close_pool, open_pool
    from svc_identity.adapters.keystore import KeyStore
    from svc_identity.config import decode_kek
    from svc_identity.domain.keys import KeyPolicy

    pool = await open_pool(lay.postgres_dsn("tp_identity"), migrations=None)
    try:
        policy = KeyPolicy(timedelta(seconds=1), timedelta(minutes=15), timedelta(seconds=60),
                           timedelta(seconds=0))
        store = KeyStore(pool, kek=decode_kek(local_key(lay, "identity-key-encryption-key")),
                         policy=policy, cache_seconds=0)
        return await store.sign(claims)
    finally:
        await close_pool(pool)


def _claims(fan: Fan, **override) -> dict:
    now = int(time.time())
    return {"iss": "ticketping-identity", "aud": "ticketping", "sub": fan.id, "role": "USER",
            "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex, **override}


@pytest.fixture(scope="module")
def fan(http: httpx.Client, mesh: Layout) -> Fan:
    return sign_up(http)


def test_sign_up_log_in_me(http: httpx.Client, fan: Fan):
    me = http.get("/v1/users/me", headers=fan.auth)
    assert me.status_code == 200, me.text
    body = me.json()
    assert (body["id"], body["email"], body["role"]) == (fan.id, fan.email, "ROLE_USER")
    claims = jwt.decode(fan.access_token, options={"verify_signature": False})
    header = jwt.get_unverified_header(fan.access_token)
    assert header["alg"] == "ES256" and header["kid"]
    assert claims["sub"] == fan.id and claims["role"] == "USER"
    assert 0 < claims["exp"] - claims["iat"] <= 15 * 60


def test_a_token_in_the_url_is_no_token(http: httpx.Client, fan: Fan):
    """Only the Authorization header carries a user token: a URL's ?access_token= (jwt_authn's
    default) would leave live tokens in logs and skip the edge's routing of tokened calls."""
    assert http.get("/v1/users/me", params={"access_token": fan.access_token}).status_code == 401
    assert http.get("/v1/users/me", headers=fan.auth).status_code == 200


def test_public_jwks_lists_the_signing_key(http: httpx.Client, fan: Fan):
    keys = http.get("/.well-known/jwks.json").json()["keys"]
    kid = jwt.get_unverified_header(fan.access_token)["kid"]
    jwk = next(k for k in keys if k["kid"] == kid)
    assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("EC", "P-256", "ES256")
    public = jwt.PyJWK(jwk).key
    assert jwt.decode(fan.access_token, public, algorithms=["ES256"], audience="ticketping")["sub"] == fan.id


def _bad_tokens(lay: Layout, fan: Fan) -> dict[str, str]:
    header, payload, signature = fan.access_token.split(".")
    claims = jwt.decode(fan.access_token, options={"verify_signature": False})
    as_admin = _b64(json.dumps({**claims, "role": "ADMIN"}).encode())
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    stranger = ec.generate_private_key(ec.SECP256R1())
    kid = jwt.get_unverified_header(fan.access_token)["kid"]
    none_header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    sign = lambda c: asyncio.run(_sign_with_identity_key(lay, c))  # noqa: E731
    return {
        "expired": sign(_claims(fan, iat=int(time.time()) - 3600, exp=int(time.time()) - 600)),
        "tampered payload": f"{header}.{as_admin}.{signature}",
        "tampered signature": f"{header}.{payload}.{flipped}",
        "signed by another key with identity's kid": jwt.encode(
            _claims(fan), stranger, algorithm="ES256", headers={"kid": kid}),
        "alg none": f"{none_header}.{as_admin}.",
        "wrong audience": sign(_claims(fan, aud="someone-else")),
        "wrong issuer": sign(_claims(fan, iss="https://evil.example")),
        "garbage": "not-a-jwt",
    }


def test_every_bad_token_is_refused_at_the_edge(http: httpx.Client, mesh: Layout, fan: Fan):
    before = started(mesh, "identity", "GetUser")
    cases = {"missing": {}, **{k: {"authorization": f"Bearer {t}"}
                               for k, t in _bad_tokens(mesh, fan).items()}}
    for name, headers in cases.items():
        resp = http.get("/v1/users/me", headers=headers)
        assert resp.status_code == 401, f"{name}: {resp.status_code} {resp.text}"
        assert resp.headers["content-type"].startswith("application/json"), name
        body = resp.json()
        assert body["code"] == 16 and body["details"][0]["reason"] == "UNAUTHENTICATED", name
    assert started(mesh, "identity", "GetUser") == before, "a bad token reached the service"
    # The same real key, fine claims: accepted (so the refusals above were for the right reason).
    good = asyncio.run(_sign_with_identity_key(mesh, _claims(fan)))
    assert http.get("/v1/users/me", headers={"authorization": f"Bearer {good}"}).status_code == 200


def test_a_token_the_edge_has_cached_is_refused_once_it_expires(http: httpx.Client, mesh: Layout, fan: Fan):
    """The edge keeps verified tokens (jwt_cache_config): a hit skips the signature, never the
    expiry. A token used (and cached) while valid is refused on its next use after it expired,
    past the provider's clock skew (30 s)."""
    skew = 30
    now = int(time.time())
    token = asyncio.run(_sign_with_identity_key(mesh, _claims(fan, iat=now - 60, exp=now - skew + 3)))
    auth = {"authorization": f"Bearer {token}"}
    assert http.get("/v1/users/me", headers=auth).status_code == 200  # within the skew: cached
    assert http.get("/v1/users/me", headers=auth).status_code == 200
    time.sleep(max(0.0, now + 4 - time.time()))
    resp = http.get("/v1/users/me", headers=auth)
    assert resp.status_code == 401, resp.text


def test_a_bad_token_is_refused_on_public_routes_too(http: httpx.Client):
    assert http.get("/v1/events").status_code == 200
    resp = http.get("/v1/events", headers={"authorization": "Bearer not-a-jwt"})
    assert resp.status_code == 401


def test_fan_calling_an_admin_route_is_forbidden_at_the_edge(http: httpx.Client, mesh: Layout, fan: Fan):
    before = started(mesh, "catalog", "CreateEvent")
    resp = http.post("/v1/events", json={"title": "x"}, headers=fan.auth)
    assert resp.status_code == 403, resp.text
    assert resp.json()["details"][0]["reason"] == "PERMISSION_DENIED"
    assert http.post("/v1/events", json={"title": "x"}).status_code == 401
    assert started(mesh, "catalog", "CreateEvent") == before


def test_admin_reaches_admin_routes(http: httpx.Client, admin: Fan):
    me = http.get("/v1/users/me", headers=admin.auth).json()
    assert me["role"] == "ROLE_ADMIN"
    # Past the edge: the catalog answers with its own validation error, not the edge's 403.
    resp = http.post("/v1/events", json={"title": "x"}, headers=admin.auth)
    assert resp.status_code == 400, resp.text
    assert resp.json()["details"][0]["domain"] == "ticketping.dev"


def test_spoofed_identity_headers_never_change_the_caller(http: httpx.Client, fan: Fan, admin: Fan):
    spoof = {"x-user-id": admin.id, "x-user-role": "ADMIN", "X-User-Id": admin.id}
    me = http.get("/v1/users/me", headers={**fan.auth, **spoof}).json()
    assert (me["id"], me["role"]) == (fan.id, "ROLE_USER")
    assert http.post("/v1/events", json={"title": "x"}, headers={**fan.auth, **spoof}).status_code == 403
    assert http.post("/v1/events", json={"title": "x"}, headers=spoof).status_code == 401
    # On a public route without a token the spoofed headers are dropped too: no admin view.
    assert http.get(f"/v1/users/{admin.id}", headers=spoof).status_code == 401


def test_refresh_rotates_and_reuse_revokes_the_family(http: httpx.Client):
    fan = sign_up(http)
    first = http.post("/v1/sessions:refresh", json={"refreshToken": fan.refresh_token})
    assert first.status_code == 200, first.text
    newer = first.json()["refreshToken"]
    assert newer != fan.refresh_token
    reused = http.post("/v1/sessions:refresh", json={"refreshToken": fan.refresh_token})
    assert reused.status_code == 401
    assert reused.json()["details"][0]["reason"] == "REFRESH_TOKEN_REUSED"
    # The whole family is gone, the newest token included.
    assert http.post("/v1/sessions:refresh", json={"refreshToken": newer}).status_code == 401


def test_log_out_revokes_the_session(http: httpx.Client):
    fan = sign_up(http)
    resp = http.post("/v1/sessions:revoke", json={"refreshToken": fan.refresh_token}, headers=fan.auth)
    assert resp.status_code == 200, resp.text
    assert http.post("/v1/sessions:refresh", json={"refreshToken": fan.refresh_token}).status_code == 401
    assert http.post("/v1/sessions:revoke", json={"refreshToken": "x"}).status_code == 401


async def test_concurrent_sign_ups_with_one_email_make_one_account(edge_url: str):
    email = new_email("race")
    async with httpx.AsyncClient(base_url=edge_url, timeout=60,
                                 limits=httpx.Limits(max_connections=100)) as client:
        replies = await asyncio.gather(*(
            client.post("/v1/users", json={"email": email.upper() if i % 2 else email,
                                           "password": "0123456789ab", "displayName": f"F{i}"})
            for i in range(100)))
    codes = sorted(r.status_code for r in replies)
    assert codes.count(200) == 1 and codes.count(409) == 99, codes
    reason = next(r for r in replies if r.status_code == 409).json()["details"][0]["reason"]
    assert reason == "EMAIL_TAKEN"


def test_same_answer_for_unknown_email_and_wrong_password(http: httpx.Client, fan: Fan):
    wrong = log_in(http, fan.email, "wrong password 123")
    unknown = log_in(http, new_email("nobody"), "wrong password 123")
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()


def _client_from(edge_url: str) -> httpx.Client:
    """A client whose connections leave from a loopback address of its own: another "client" to
    the edge's per-client throttle, so these tests don't slow down the rest of the suite."""
    address = f"127.{secrets.randbelow(250) + 1}.{secrets.randbelow(256)}.{secrets.randbelow(250) + 2}"
    return httpx.Client(base_url=edge_url, timeout=15,
                        transport=httpx.HTTPTransport(local_address=address))


def test_repeated_failed_logins_for_one_account_are_slowed_down(edge_url: str, http: httpx.Client):
    fan = sign_up(http)
    with _client_from(edge_url) as client:
        codes = [log_in(client, fan.email, "wrong password 123").status_code for _ in range(7)]
        assert codes[:5] == [401] * 5 and codes[-1] == 429, codes
        last = log_in(client, fan.email, fan.password).json()  # even the right password waits
    assert last["details"][0]["reason"] == "TOO_MANY_ATTEMPTS"
    assert int(last["details"][0]["metadata"]["retry_after_seconds"]) > 0
    # The account is not locked for everyone forever: the wait is bounded and says how long.
    assert int(last["details"][0]["metadata"]["retry_after_seconds"]) <= 900


def test_repeated_failed_logins_from_one_client_are_slowed_down(edge_url: str):
    with _client_from(edge_url) as client:
        codes = [log_in(client, new_email("nobody"), "wrong password 123").status_code
                 for _ in range(25)]
    assert codes[0] == 401 and codes[-1] == 429, codes
    # Another client is not affected.
    with _client_from(edge_url) as other:
        assert log_in(other, new_email("nobody"), "wrong password 123").status_code == 401


def test_oversized_bodies_are_refused_at_the_edge(http: httpx.Client, mesh: Layout):
    before = started(mesh, "identity", "CreateUser")
    big = {"email": new_email(), "password": "x" * (300 * 1024), "displayName": "Big"}
    resp = http.post("/v1/users", json=big)
    assert resp.status_code == 413
    assert resp.json()["details"][0]["reason"] == "BODY_TOO_LARGE"
    assert started(mesh, "identity", "CreateUser") == before


def test_keys_rotate_without_restarting_envoy(http: httpx.Client, mesh: Layout, fan: Fan):
    old_kid = jwt.get_unverified_header(fan.access_token)["kid"]
    done = identity_command(mesh, "rotate-keys", "--wait")
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 30
    while True:  # the running service sees the rotation within TP_KEY_CACHE_SECONDS
        fresh = log_in(http, fan.email, fan.password).json()["accessToken"]
        if jwt.get_unverified_header(fresh)["kid"] != old_kid or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert jwt.get_unverified_header(fresh)["kid"] != old_kid
    assert http.get("/v1/users/me", headers={"authorization": f"Bearer {fresh}"}).status_code == 200
    # Tokens signed before the rotation stay valid until they expire.
    assert http.get("/v1/users/me", headers=fan.auth).status_code == 200


def test_booking_routes_need_an_admission_token_too(http: httpx.Client, mesh: Layout, fan: Fan):
    before = started(mesh, "booking", "CreateHold")
    body = {"seatIds": ["A-1-1"], "requestId": str(uuid.uuid4())}
    no_admission = http.post("/v1/events/e1/holds", json=body, headers=fan.auth)
    assert no_admission.status_code == 401, no_admission.text
    # A user token is not an admission token: only the waiting room's keys sign those.
    user_as_admission = http.post("/v1/events/e1/holds", json=body,
                                  headers={**fan.auth, "x-admission-token": fan.access_token})
    assert user_as_admission.status_code == 401, user_as_admission.text
    assert started(mesh, "booking", "CreateHold") == before
