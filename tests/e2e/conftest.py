"""Helpers for tests that go through the edge exactly as the mobile app does."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from devstack.components import service_env
from devstack.layout import ROOT, Layout


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


def log_in(http: httpx.Client, email: str, password: str) -> httpx.Response:
    return http.post("/v1/sessions", json={"email": email, "password": password})


def sign_up(http: httpx.Client, email: str | None = None, password: str = "correct horse battery") -> Fan:
    email = email or new_email()
    created = http.post("/v1/users", json={"email": email, "password": password, "displayName": "Fan"})
    assert created.status_code == 200, created.text
    session = log_in(http, email, password)
    assert session.status_code == 200, session.text
    body = session.json()
    return Fan(created.json()["id"], email, password, body["accessToken"], body["refreshToken"])


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
