"""What `make up` seeds for a newcomer: a demo admin, a demo fan and a demo event.

The accounts are for this machine's local stack only. Their credentials come from the
environment, with documented defaults (README): TP_DEMO_ADMIN_EMAIL / TP_DEMO_ADMIN_PASSWORD and
TP_DEMO_FAN_EMAIL / TP_DEMO_FAN_PASSWORD. Every step is idempotent, so `make up` twice is harmless.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass

from .components import service_env
from .layout import ROOT, Layout


@dataclass(frozen=True)
class DemoAccount:
    role: str
    email: str
    password: str


def accounts() -> list[DemoAccount]:
    env = os.environ.get
    return [
        DemoAccount("ADMIN", env("TP_DEMO_ADMIN_EMAIL", "admin@example.com"),
                    env("TP_DEMO_ADMIN_PASSWORD", "demo-admin-password")),
        DemoAccount("USER", env("TP_DEMO_FAN_EMAIL", "fan@example.com"),
                    env("TP_DEMO_FAN_PASSWORD", "demo-fan-password")),
    ]


def ensure_account(layout: Layout, account: DemoAccount) -> None:
    env = {**os.environ, **service_env(layout, layout.service("identity")),
           "TP_USER_PASSWORD": account.password}
    done = subprocess.run(
        [sys.executable, "-m", "svc_identity", "ensure-user", "--email", account.email,
         "--display-name", f"Demo {account.role.lower()}", "--role", account.role],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"could not create the demo account {account.email}: {done.stderr[-800:]}")


def seed(layout: Layout) -> str:
    """Create the demo accounts and event; return the lines `make up` prints about them."""
    from svc_catalog.demo import load_demo

    found = accounts()
    for account in found:
        ensure_account(layout, account)
    event = asyncio.run(load_demo(f"127.0.0.1:{layout.service('catalog').grpc_port}"))
    lines = ["Demo (local only; override with TP_DEMO_* variables):"]
    lines += [f"  {a.role.lower():<5}  {a.email} / {a.password}" for a in found]
    lines += [f"  event  {event.name}  \"{event.title}\"  ({layout.edge_url}/v1/{event.name})",
              f"  try    curl -s {layout.edge_url}/v1/events"]
    return "\n".join(lines)
