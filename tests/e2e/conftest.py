"""Helpers for tests that go through the edge exactly as the mobile app does."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import pytest
from ticketping.identity.v1 import identity_service_pb2 as identity_pb
from ticketping.identity.v1 import identity_service_pb2_grpc as identity_grpc

from devstack.components import service_env
from devstack.layout import ROOT, Layout


class _Bounded(httpx.AsyncHTTPTransport):
    """A transport that lets at most `connections` requests at a time into its connection pool.

    httpcore matches every waiting request against every connection each time one changes: a
    thousand requests waiting in the pool at once cost tens of seconds of CPU. Waiting here
    instead costs nothing, and the pool still has all its connections busy."""

    def __init__(self, connections: int) -> None:
        super().__init__(limits=httpx.Limits(max_connections=connections,
                                             max_keepalive_connections=connections))
        self._slots = asyncio.Semaphore(connections)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        async with self._slots:
            return await super().handle_async_request(request)


def crowd_client(base_url: str, connections: int = 32, timeout: float = 30.0) -> httpx.AsyncClient:
    """An AsyncClient for many fans at once (asyncio.gather over hundreds of requests), with a
    bounded connection pool."""
    return httpx.AsyncClient(base_url=base_url, transport=_Bounded(connections), timeout=timeout)


@pytest.fixture(scope="module")
def http(edge_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=edge_url, timeout=15) as client:
        yield client


@dataclass
class Fan:
    id: str
    email: str
    password: str
    access_token: str
    refresh_token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.access_token}"}


def new_email(prefix: str = "fan") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


def _credentials(email: str, password: str) -> dict[str, str]:
    return {"email": email, "password": password}


def log_in(http: httpx.Client, email: str, password: str) -> httpx.Response:
    return http.post("/v1/sessions", json=_credentials(email, password))


PASSWORD = "correct horse battery"


def _new_user(email: str, password: str) -> dict[str, str]:
    return {**_credentials(email, password), "displayName": "Fan"}


def _signed_up(user_id: str, session: httpx.Response, email: str, password: str) -> Fan:
    assert session.status_code == 200, session.text
    body = session.json()
    return Fan(user_id, email, password, body["accessToken"], body["refreshToken"])


def sign_up(http: httpx.Client, email: str | None = None, password: str = PASSWORD) -> Fan:
    email = email or new_email()
    created = http.post("/v1/users", json=_new_user(email, password))
    assert created.status_code == 200, created.text
    return _signed_up(created.json()["id"], log_in(http, email, password), email, password)


async def sign_up_async(client: httpx.AsyncClient, email: str | None = None,
                        password: str = PASSWORD) -> Fan:
    """sign_up for tests that sign up many fans at once (an AsyncClient with a bounded pool)."""
    email = email or new_email()
    created = await client.post("/v1/users", json=_new_user(email, password))
    assert created.status_code == 200, created.text
    session = await client.post("/v1/sessions", json=_credentials(email, password))
    return _signed_up(created.json()["id"], session, email, password)


async def sign_up_many(lay: Layout, n: int, in_flight: int = 24) -> list[Fan]:
    """n new fans, each signed up and logged in at the edge: for tests that need thousands.

    The same two calls as sign_up (CreateUser, CreateSession) and the same tokens, over the
    edge's native gRPC port: measured here, an httpx request costs the test's own process about
    3 ms of CPU and a gRPC call 0.6 ms, and that CPU is taken from identity's password hashes on
    a 2-core machine. `in_flight` a few more than identity's hashing threads keeps them busy;
    more only queue."""
    gate = asyncio.Semaphore(in_flight)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{lay.edge_port}") as channel:
        stub = identity_grpc.IdentityServiceStub(channel)

        async def one() -> Fan:
            email = new_email()
            async with gate:
                user = await stub.CreateUser(identity_pb.CreateUserRequest(
                    email=email, password=PASSWORD, display_name="Fan"), timeout=60)
                session = await stub.CreateSession(identity_pb.CreateSessionRequest(
                    email=email, password=PASSWORD), timeout=60)
            return Fan(user.id, email, PASSWORD, session.access_token, session.refresh_token)

        return list(await asyncio.gather(*(one() for _ in range(n))))


def identity_command(
    lay: Layout, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m svc_identity <args>` with the settings devstack gives the running service."""
    full_env = {**os.environ, **service_env(lay, lay.service("identity")), **(env or {})}
    return subprocess.run([sys.executable, "-m", "svc_identity", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def admin(http: httpx.Client, mesh: Layout) -> Fan:
    """An ADMIN made the documented way (ensure-user, as `make up` does), logged in at the edge."""
    email, password = new_email("admin"), "admin password 0123"
    done = identity_command(mesh, "ensure-user", "--email", email, "--display-name", "Admin",
                            "--role", "ADMIN", env={"TP_USER_PASSWORD": password})
    assert done.returncode == 0, done.stderr
    body = log_in(http, email, password).json()
    me = http.get("/v1/users/me", headers={"authorization": f"Bearer {body['accessToken']}"}).json()
    return Fan(me["id"], email, password, body["accessToken"], body["refreshToken"])
