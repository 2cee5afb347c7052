"""A sandbox provider in a process of its own, for the tests that kill -9 it (test_payment_sandbox.py).

``python -m tests.integration.sandbox_process`` reads one JSON line on stdin::

    {"dsn", "url", "secret", "delay", "timeout", "lease",
     "checkouts": [{"name", "payment_id", "order", "units", "outcome"?, "plan"?: [outcome, delay]}]}

opens the checkouts in that order, prints ``READY {name: reference}`` once create_checkout has
returned for every one, then delivers callbacks until it is killed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid

from meshkit.db import open_pool
from svc_payment.adapters.provider import SandboxProvider
from svc_payment.bootstrap import MIGRATIONS
from svc_payment.domain.model import Money


async def main() -> None:
    spec = json.loads(sys.stdin.readline())
    pool = await open_pool(spec["dsn"], migrations=MIGRATIONS, max_size=4, name="sandbox-child")
    provider = SandboxProvider(pool, spec["url"], spec["secret"].encode(), delay=spec["delay"],
                               timeout=spec["timeout"], lease=spec["lease"])
    await provider.start()
    refs = {}
    for c in spec["checkouts"]:
        if c.get("plan"):
            provider.plan(c["order"], c["plan"][0], c["plan"][1])
        refs[c["name"]] = await provider.create_checkout(uuid.UUID(c["payment_id"]), c["order"],
                                                         Money("KRW", c["units"]), c.get("outcome"))
    print("READY " + json.dumps(refs), flush=True)
    await asyncio.Event().wait()  # until SIGKILL


if __name__ == "__main__":
    asyncio.run(main())
