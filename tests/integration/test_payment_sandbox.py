"""The sandbox PSP survives what a real PSP survives: the merchant's process dying.

Real PostgreSQL (a fresh database with payment's migrations), the sandbox provider in this process
and, for the crash, in a child process killed with SIGKILL; a small HTTP receiver stands in for
the webhook: it checks every signature and records what arrives, when, and how many sends of one
callback overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from psycopg_pool import AsyncConnectionPool

from devstack.layout import Layout
from meshkit.db import close_pool, open_pool
from meshkit.errors import DomainError
from svc_payment.adapters.provider import ProviderRefused, SandboxProvider
from svc_payment.bootstrap import MIGRATIONS
from svc_payment.domain import model
from svc_payment.domain.model import Money

from ..support import fresh_database, read_http_request

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"test-sandbox-secret-0123456789"


# --- the webhook's stand-in ------------------------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    reference: str
    event_id: str
    type: str
    reason: str
    amount: str
    at: float  # wall clock, like the database's timestamps
    status: int  # what the receiver answered (0: held, never answered)


class Receiver:
    """POST /webhook: verifies the signature, records the callback, answers 200 unless told not to."""

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.receipts: list[Receipt] = []
        self.fail_first: Counter[str] = Counter()  # reference -> how many sends to refuse (503)
        self.hold: set[str] = set()  # references whose next send is never answered
        self.release = asyncio.Event()
        self.bad_signatures = 0
        self._inflight: Counter[str] = Counter()
        self.max_inflight: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/webhook"
        return self.url

    async def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.close()

    def of(self, reference: str, status: int | None = None) -> list[Receipt]:
        return [r for r in self.receipts
                if r.reference == reference and (status is None or r.status == status)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            headers, body = await read_http_request(reader)
            status = await self._handle(headers, body)
            if status:
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n"
                             "connection: close\r\n\r\n".encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _handle(self, headers: dict[str, str], body: bytes) -> int:
        try:
            model.verify(SECRET, headers.get(model.SIGNATURE_HEADER, ""), body, time.time(), 300)
        except DomainError:
            self.bad_signatures += 1
            return 401
        data = json.loads(body)
        ref = data["reference"]

        def record(status: int) -> None:
            self.receipts.append(Receipt(ref, data["id"], data["type"], data.get("reason", ""),
                                         data["amount"], time.time(), status))
        if ref in self.hold:  # its sender is about to die: not counted as in flight
            self.hold.discard(ref)
            record(0)
            await self.release.wait()
            return 0
        self._inflight[ref] += 1
        self.max_inflight[ref] = max(self.max_inflight[ref], self._inflight[ref])
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            status = 200
            if self.fail_first[ref] > 0:
                self.fail_first[ref] -= 1
                status = 503
            record(status)
            return status
        finally:
            self._inflight[ref] -= 1


# --- fixtures and helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox_dsn(infra: Layout) -> Iterator[str]:
    with fresh_database(infra) as dsn:
        yield dsn


@pytest_asyncio.fixture(loop_scope="session")
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


@contextlib.asynccontextmanager
async def replica(dsn: str, url: str, **kw: Any) -> AsyncIterator[SandboxProvider]:
    """One svc_payment replica's sandbox: its own pool on the shared database, its delivery loop."""
    pool = await open_pool(dsn, migrations=MIGRATIONS, max_size=4, name="sandbox-test")
    provider = SandboxProvider(pool, url, SECRET, **{"delay": 0.3, "timeout": 1.0, **kw})
    await provider.start()
    try:
        yield provider
    finally:
        await provider.close()
        await close_pool(pool)


async def wait_for(what: str, check: Callable[[], Awaitable[bool] | bool], patience: float = 20.0) -> None:
    deadline = time.monotonic() + patience
    while True:
        ok = check()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.02)


async def stored(pool: AsyncConnectionPool, reference: str) -> dict[str, Any]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT event_id, outcome, created_at, due_at, attempts, delivered_at, given_up_at, claim "
            "FROM sandbox_checkouts WHERE reference = %s", (reference,))
        row = await cur.fetchone()
    assert row is not None, reference
    keys = ("event_id", "outcome", "created_at", "due_at", "attempts", "delivered_at", "given_up_at", "claim")
    return dict(zip(keys, row, strict=True))


def order() -> str:
    return f"orders/{uuid.uuid4()}"


EXPECTED_TYPE = {"approve": model.SUCCEEDED_TYPE, "decline": model.FAILED_TYPE}


# --- tests ---------------------------------------------------------------------------------------------


async def test_callbacks_survive_a_kill_9_of_the_process_that_took_the_checkouts(
    sandbox_dsn: str, receiver: Receiver, tmp_path: Path,
) -> None:
    """A process opens checkouts (approve, decline and never; by plan, by the caller's outcome and
    by default), delivers one, is killed with SIGKILL while another is on the wire, and none of the
    rest has been sent. Two new replicas on the same database send every callback as planned:
    the right type and amount, not before its due time, the stored event id on every send (the
    interrupted one included), once each (the interrupted one: again after its lease), one send at
    a time, and nothing for `never`."""
    url = receiver.url
    delay = 3.0  # the child is killed well before these are due, even on a busy machine
    plans: dict[str, tuple[str, float]] = {}  # name -> (outcome, delay) as planned
    checkouts: list[dict[str, Any]] = []

    def add(name: str, outcome: str, *, via: str, wait: float | None = None, units: int = 1000) -> None:
        c: dict[str, Any] = {"name": name, "payment_id": str(uuid.uuid4()), "order": order(), "units": units}
        if via == "plan":
            c["plan"] = [outcome, wait]
        elif via == "argument":
            c["outcome"] = outcome
        checkouts.append(c)
        plans[name] = (outcome, delay if wait is None else wait)

    add("early", "approve", via="plan", wait=0.0)  # delivered before the crash
    add("on-the-wire", "approve", via="plan", wait=0.0)  # being sent when the crash comes
    for i in range(4):
        add(f"approve-plan-{i}", "approve", via="plan", units=1000 + i)
    for i in range(3):
        add(f"decline-arg-{i}", "decline", via="argument", units=2000 + i)
    for i in range(3):
        add(f"default-{i}", "approve", via="default", units=3000 + i)
    add("never-plan", "never", via="plan")
    add("never-arg", "never", via="argument")
    add("refused-once", "approve", via="plan")

    spec = {"dsn": sandbox_dsn, "url": url, "secret": SECRET.decode(), "delay": delay,
            "timeout": 2.0, "lease": 3.0, "checkouts": checkouts}
    # The child's first callbacks may leave before it prints READY: set the receiver up beforehand
    # (a reference is sbx_<payment id hex>).
    refs_by_name = {c["name"]: f"sbx_{uuid.UUID(c['payment_id']).hex}" for c in checkouts}
    receiver.hold = {refs_by_name["on-the-wire"]}
    receiver.fail_first[refs_by_name["refused-once"]] = 1
    log = (tmp_path / "child.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.integration.sandbox_process", cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(spec).encode() + b"\n")
        await proc.stdin.drain()
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.startswith(b"READY "), line
        refs: dict[str, str] = json.loads(line[len(b"READY "):])
        assert refs == refs_by_name
        pool = await open_pool(sandbox_dsn, migrations=MIGRATIONS, max_size=2, name="sandbox-check")
        try:
            async def early_recorded() -> bool:
                return (await stored(pool, refs["early"]))["delivered_at"] is not None
            await wait_for("the early callback delivered and recorded", early_recorded)
            await wait_for("a callback on the wire", lambda: bool(receiver.of(refs["on-the-wire"])))
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
            killed_at = time.time()
            before = Counter(r.reference for r in receiver.receipts)
            # Nothing else had left: what follows is the new replicas' doing.
            assert before == Counter({refs["early"]: 1, refs["on-the-wire"]: 1}), before
            rows = {name: await stored(pool, ref) for name, ref in refs.items()}
            assert all(killed_at < r["created_at"].timestamp() + delay for n, r in rows.items()
                       if n.startswith(("approve", "decline", "default", "refused")))

            async with replica(sandbox_dsn, url) as b, replica(sandbox_dsn, url) as c:
                async def all_delivered() -> bool:
                    return all([(await stored(pool, refs[n]))["delivered_at"] is not None
                                for n, (o, _) in plans.items() if o != "never"])
                await wait_for("every callback delivered and recorded", all_delivered)
                await asyncio.sleep(0.6)  # a poll later: no stray re-send, nothing for `never`
                sent = b.sent_total + c.sent_total
            for name, ref in refs.items():
                outcome, wait = plans[name]
                row = await stored(pool, ref)
                got = receiver.of(ref)
                assert row["outcome"] == outcome, name
                if outcome == "never":
                    assert got == [] and row["due_at"] is None and row["delivered_at"] is None, name
                    continue
                assert row["delivered_at"] is not None and row["due_at"] is None, name
                assert {r.event_id for r in got} == {row["event_id"]}, name  # stable across the crash
                assert {r.type for r in got} == {EXPECTED_TYPE[outcome]}, name
                assert {r.reason for r in got} == ({"CARD_DECLINED"} if outcome == "decline" else {""})
                units = next(int(x["units"]) for x in checkouts if x["name"] == name)
                assert {r.amount for r in got} == {str(units)}, name
                due = row["created_at"].timestamp() + wait
                assert got[0].at >= due - 0.05, (name, got[0].at - due)
                assert [r.status for r in got] == {"early": [200], "on-the-wire": [0, 200],
                                                   "refused-once": [503, 200]}.get(name, [200]), name
                assert receiver.max_inflight[ref] <= 1, name
            # The interrupted send came back once its lease (3 s from the claim) had run out.
            wire = receiver.of(refs["on-the-wire"])
            assert wire[1].at - wire[0].at >= 2.9
            assert sent == len(receiver.receipts) - 2  # the new replicas sent the rest, no more
            assert receiver.bad_signatures == 0
        finally:
            await close_pool(pool)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()


async def test_two_replicas_share_the_callbacks_one_send_at_a_time(sandbox_dsn: str) -> None:
    """Two replicas deliver what both created, retrying refused callbacks with backoff; each
    callback is sent by one of them at a time, exactly once per needed send, with its stored
    event id, within milliseconds of its due time; a cancelled checkout still calls back."""
    receiver = Receiver(latency=0.02)
    url = await receiver.start()
    try:
        async with replica(sandbox_dsn, url, retry_backoff=0.2) as a, \
                replica(sandbox_dsn, url, retry_backoff=0.2) as b:
            made: list[tuple[str, str, float]] = []  # (reference, outcome, due wall time)
            cancelled: list[str] = []

            async def make(i: int) -> None:
                p = a if i % 2 else b
                outcome = "decline" if i % 3 == 0 else "approve"
                ref = await p.create_checkout(uuid.uuid4(), order(), Money("KRW", 500), outcome)  # type: ignore[arg-type]
                if i % 4 == 0:
                    receiver.fail_first[ref] = 2
                if i == 5:
                    await p.cancel(ref)
                    cancelled.append(ref)
                made.append((ref, outcome, time.time() + 0.3))
            await asyncio.gather(*(make(i) for i in range(60)))
            async def all_delivered() -> bool:
                return all([(c := await a.checkout(r)) is not None and c.delivered for r, _, _ in made])
            await wait_for("every callback delivered and recorded", all_delivered)
            await asyncio.sleep(0.6)
            for ref, outcome, _ in made:
                got = receiver.of(ref)
                row = await a.checkout(ref)
                assert row is not None and row.delivered and row.attempts == len(got)
                assert [r.status for r in got] == ([503, 503, 200] if ref in receiver.fail_first else [200])
                assert {r.event_id for r in got} == {row.event_id}
                assert {r.type for r in got} == {EXPECTED_TYPE[outcome]}
                assert receiver.max_inflight[ref] == 1
            row = await b.checkout(cancelled[0])
            assert row is not None and row.cancelled and row.delivered
            assert a.sent_total + b.sent_total == len(receiver.receipts)
            first = sorted(min(x.at for x in receiver.of(r)) - due for r, _, due in made)
            print(f"first send after its due time: p50 {first[len(first) // 2] * 1000:.0f} ms, "
                  f"max {first[-1] * 1000:.0f} ms; sent by A {a.sent_total}, by B {b.sent_total}")
    finally:
        await receiver.stop()


async def test_delivered_marks_are_written_together_and_a_close_right_after_keeps_them(
    sandbox_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of callbacks delivered at once is marked by a few statements, not one each; and a
    replica closed the moment its last callback was answered still records every delivery (none
    is sent again by the next replica)."""
    from svc_payment.adapters import provider as provider_module
    receiver = Receiver()
    url = await receiver.start()
    try:
        async with replica(sandbox_dsn, url, delay=0.2) as a:
            marks = 0
            real = provider_module.SandboxProvider._mark_delivered

            async def counted(self: SandboxProvider) -> None:
                nonlocal marks
                marks += 1
                await real(self)
            monkeypatch.setattr(provider_module.SandboxProvider, "_mark_delivered", counted)
            refs = await asyncio.gather(*(a.create_checkout(uuid.uuid4(), order(), Money("KRW", 500))
                                          for _ in range(40)))
            await wait_for("every callback answered", lambda: len(receiver.receipts) == len(refs))
        # Closed: whatever was still gathering has been written.
        async with replica(sandbox_dsn, url) as b:
            for ref in refs:
                row = await b.checkout(ref)
                assert row is not None and row.delivered and row.due_at is None, ref
            await asyncio.sleep(0.5)
        assert len(receiver.receipts) == len(refs)  # nothing sent twice
        assert 1 <= marks <= 10, f"{marks} statements marked {len(refs)} deliveries"
    finally:
        await receiver.stop()


async def test_a_graceful_close_hands_an_interrupted_send_over_at_once(sandbox_dsn: str) -> None:
    receiver = Receiver()
    url = await receiver.start()
    try:
        async with replica(sandbox_dsn, url, timeout=5.0) as b:
            async with replica(sandbox_dsn, url, timeout=5.0) as a:
                ref = f"sbx_{uuid.uuid4().hex}"
                receiver.hold.add(ref)
                a.plan("orders/x", "approve", 0.0)
                assert await a.create_checkout(uuid.UUID(ref[4:]), "orders/x", Money("KRW", 7)) == ref
                await wait_for("the send on the wire", lambda: bool(receiver.of(ref)))
            closed_at = time.time()  # a stopped: its claim (7 s) is released, not waited out
            await wait_for("b re-sends it", lambda: bool(receiver.of(ref, 200)), patience=5)
            assert receiver.of(ref, 200)[0].at - closed_at < 1.5

            async def delivered() -> bool:
                row = await b.checkout(ref)
                return row is not None and row.delivered
            await wait_for("b records it delivered", delivered)
            row = await b.checkout(ref)
            assert row is not None and row.event_id == receiver.of(ref)[0].event_id
            assert row.attempts == 2  # a's interrupted send, b's
    finally:
        await receiver.stop()


async def test_checkouts_and_refunds_are_idempotent_across_replicas(sandbox_dsn: str) -> None:
    receiver = Receiver()
    url = await receiver.start()
    try:
        async with replica(sandbox_dsn, url) as a, replica(sandbox_dsn, url) as b:
            pid, o = uuid.uuid4(), order()
            a.plan(o, "never")
            ref = await a.create_checkout(pid, o, Money("KRW", 900))
            # a retry (after a crash, on another replica): the same checkout, the same event id
            b.plan(o, "approve", 0.0)
            assert await b.create_checkout(pid, o, Money("KRW", 900)) == ref
            row = await b.checkout(ref)
            assert row is not None and row.outcome == "never" and row.due_at is None
            # the retry did not use b's plan: it is still there for the order's next checkout
            other = await b.create_checkout(uuid.uuid4(), o, Money("KRW", 900))
            await wait_for("the planned callback", lambda: bool(receiver.of(other, 200)))

            key = str(pid)
            ids = await asyncio.gather(*(p.refund(ref, Money("KRW", 900), key) for p in (a, b) * 4))
            assert len(set(ids)) == 1 and ids[0].startswith("sbx_re_")
            refund = await b.refund_of(key)
            assert refund is not None and (refund.refund_id, refund.amount) == (ids[0], Money("KRW", 900))
            assert [r.refund_id for r in await a.refunds_of(ref)] == [ids[0]]
            await a.cancel(ref)
            await a.cancel(ref)
            row = await b.checkout(ref)
            assert row is not None and row.cancelled
            # Like a PSP, it refuses to refund a charge it never made, and keeps no record of it.
            unknown = f"sbx_{uuid.uuid4().hex}"
            with pytest.raises(ProviderRefused, match=unknown):
                await a.refund(unknown, Money("KRW", 900), str(uuid.uuid4()))
            assert await a.refunds_of(unknown) == []
    finally:
        await receiver.stop()
