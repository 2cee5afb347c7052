"""The payment provider (PSP) adapter, and the built-in sandbox provider.

A provider opens a checkout for a payment (idempotent on the payment id), later tells us the
outcome through a signed webhook, cancels an abandoned checkout, and refunds captured money
(idempotent on a key: one refund per payment, however often it is asked).

:class:`SandboxProvider` behaves like a real PSP seen from outside: after a delay it POSTs a signed
callback to the webhook URL (through the edge, like any provider), re-sends it with backoff until
it gets a 2xx, and re-sends the same event id each time. The outcome is per payment: ``approve``,
``decline`` or ``never`` (no callback at all), from the settings' default, a test hook
(:meth:`SandboxProvider.plan`) or, when enabled, the caller's ``x-sandbox-outcome`` metadata.

Its state is in PostgreSQL (``sandbox_checkouts``, ``sandbox_refunds``: migration
``0003_sandbox.sql``), not in the process, because a real PSP's state does not die with the
merchant's process:

* :meth:`~SandboxProvider.create_checkout` commits the checkout (amount, outcome, the callback's
  event id, when it is due) before it returns. A kill -9 of svc_payment right after loses nothing.
* Every replica runs one delivery loop. It claims due rows with ``FOR UPDATE SKIP LOCKED`` and, in
  the same statement, moves their ``due_at`` one lease ahead (a visibility timeout, as in SQS): a
  claimed callback is sent by that replica alone, and if the replica dies mid-send the row becomes
  due again when the lease ends and whichever replica runs (the restarted one or another) re-sends
  it. Each send runs in its own task with a deadline shorter than the lease; its result (delivered,
  retry at now + backoff, given up) is written only if the claim is still the sender's. A replica
  claims no more than it can send at once (``max_in_flight``), so no claimed callback waits in a
  queue while its lease runs out.
* Duplicates are possible (a crash after the merchant's 2xx but before it is recorded) and
  harmless: the event id is stored, so every send of a callback carries the same id and the
  webhook de-duplicates on it.
* Wake-up: the loop sleeps until the earliest ``due_at`` in the table or ``poll_interval``,
  whichever is sooner; a checkout created (or a send failed) in this process wakes it at once if
  its callback is due earlier. A callback is therefore sent within milliseconds of its due time by
  the replica that created it, and within ``poll_interval`` after its due time or lease by any
  other replica if that one is gone.
* Refunds are idempotent on their key across restarts and replicas; a cancellation is recorded
  (``cancelled_at``) and, as at a real PSP, does not stop a callback already on its way.
* :meth:`~SandboxProvider.close` releases the claims of sends it interrupts, so a graceful restart
  re-sends them at once instead of after the lease.

The sandbox uses its own small pool (see ``bootstrap.py``): the service calls it while holding a
connection of its own pool (a refund inside the webhook's transaction), and sharing one pool could
starve under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, cast
from urllib.parse import urlsplit

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from meshkit import http1
from meshkit.db import autocommit

from ..domain.model import FAILED_TYPE, SIGNATURE_HEADER, SUCCEEDED_TYPE, Money, sign, webhook_body

log = logging.getLogger(__name__)

Outcome = Literal["approve", "decline", "never"]
OUTCOMES: tuple[str, ...] = ("approve", "decline", "never")

MAX_BACKOFF = 30.0  # seconds between two sends of one callback, at most
MIN_WAIT = 0.01  # the loop's shortest sleep: due rows held by another replica's claim in progress
LEASE_MARGIN = 2.0  # a claim outlives the send's deadline by this much


class ProviderError(RuntimeError):
    """The provider could not be reached or failed; the caller retries later."""


class ProviderRefused(ProviderError):
    """The provider answered and said no (a refund of a charge it does not know, say): asking
    again gets the same answer, so the caller must not retry it forever."""


class Provider(Protocol):
    name: str

    async def create_checkout(self, payment_id: uuid.UUID, order: str, amount: Money,
                              outcome: Outcome | None = None) -> str:
        """Open a checkout; returns the provider's reference. Idempotent on ``payment_id``."""
        ...

    async def cancel(self, reference: str) -> None:
        """Abandon a checkout that was never paid (best effort)."""
        ...

    async def refund(self, reference: str, amount: Money, idempotency_key: str) -> str:
        """Give captured money back; returns the refund's id. Idempotent on ``idempotency_key``."""
        ...


@dataclass(frozen=True)
class SandboxCheckout:
    """A stored checkout, as the sandbox sees it (for tests and operators)."""

    reference: str
    payment_id: uuid.UUID
    order: str
    amount: Money
    outcome: Outcome
    event_id: str
    created_at: datetime
    due_at: datetime | None
    attempts: int
    delivered_at: datetime | None
    given_up_at: datetime | None
    cancelled_at: datetime | None
    last_error: str

    @property
    def delivered(self) -> bool:
        return self.delivered_at is not None

    @property
    def cancelled(self) -> bool:
        return self.cancelled_at is not None


@dataclass(frozen=True)
class SandboxRefund:
    idempotency_key: str
    refund_id: str
    reference: str
    amount: Money
    created_at: datetime


@dataclass(frozen=True)
class _Claimed:
    """One callback this replica holds until its lease ends."""

    reference: str
    event_id: str
    outcome: Outcome
    amount: Money
    attempts: int  # including this one
    claim: uuid.UUID


_INSERT = """
INSERT INTO sandbox_checkouts
    (reference, payment_id, order_name, currency_code, units, nanos, outcome, event_id, due_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now() + %s::interval)
ON CONFLICT (reference) DO NOTHING
"""

# Due rows nobody else is claiming right now, earliest first; each gets one more attempt and is
# hidden from the others until the lease ends.
_CLAIM = """
WITH due AS (
    SELECT reference FROM sandbox_checkouts
    WHERE due_at <= now()
    ORDER BY due_at
    LIMIT %s
    FOR UPDATE SKIP LOCKED
)
UPDATE sandbox_checkouts c
SET attempts = c.attempts + 1, due_at = now() + %s::interval, claim = %s
FROM due
WHERE c.reference = due.reference
RETURNING c.reference, c.event_id, c.outcome, c.currency_code, c.units, c.nanos, c.attempts
"""

# Seconds until the next row is due (negative: overdue), NULL if nothing is to be sent.
_NEXT_DUE = """
SELECT EXTRACT(EPOCH FROM min(due_at) - clock_timestamp())::float8
FROM sandbox_checkouts WHERE due_at IS NOT NULL
"""

# Delivered is delivered, whoever sent it: a sender whose lease ran out still settles the row.
_DELIVERED = """
UPDATE sandbox_checkouts
SET delivered_at = now(), due_at = NULL, claim = NULL, given_up_at = NULL, last_error = ''
WHERE reference = ANY(%s) AND delivered_at IS NULL
"""
# Delivered marks gather this long and are written by one statement: in a flash sale the sandbox
# delivered hundreds of callbacks a second, each marked by a round trip and a commit of its own.
# A crash in between loses only marks: those callbacks are sent again when their lease ends,
# and the webhook takes a repeat as a replay (its provider event id), as from a real PSP.
DELIVERED_GATHER = 0.02

_RETRY = """
UPDATE sandbox_checkouts SET due_at = now() + %s::interval, claim = NULL, last_error = %s
WHERE reference = %s AND claim = %s
"""

_GIVE_UP = """
UPDATE sandbox_checkouts SET due_at = NULL, claim = NULL, given_up_at = now(), last_error = %s
WHERE reference = %s AND claim = %s
"""

# close(): the sends it interrupted are due again at once (for the next replica to start).
_RELEASE = """
UPDATE sandbox_checkouts SET due_at = now(), claim = NULL
WHERE reference = ANY(%s) AND claim = ANY(%s) AND delivered_at IS NULL
"""

_CANCEL = "UPDATE sandbox_checkouts SET cancelled_at = coalesce(cancelled_at, now()) WHERE reference = %s"

# A refund of a charge the sandbox made; a PSP refuses one of a reference it never issued.
_REFUND = """
INSERT INTO sandbox_refunds (idempotency_key, refund_id, reference, currency_code, units, nanos)
SELECT %(key)s, %(id)s, %(reference)s, %(currency)s, %(units)s, %(nanos)s
WHERE EXISTS (SELECT 1 FROM sandbox_checkouts WHERE reference = %(reference)s)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING refund_id
"""

_CHECKOUT_COLUMNS = ("reference, payment_id, order_name, currency_code, units, nanos, outcome, event_id, "
                     "created_at, due_at, attempts, delivered_at, given_up_at, cancelled_at, last_error")
_REFUND_COLUMNS = "idempotency_key, refund_id, reference, currency_code, units, nanos, created_at"


def _refund_of(row: Any) -> SandboxRefund:
    key, refund_id, reference, currency, units, nanos, created = row
    return SandboxRefund(key, refund_id, reference, Money(currency, units, nanos), created)


class SandboxProvider:
    name = "sandbox"

    def __init__(
        self,
        pool: AsyncConnectionPool,
        webhook_url: str,
        secret: bytes,
        *,
        delay: float = 1.0,
        outcome: Outcome = "approve",
        max_attempts: int = 8,
        retry_backoff: float = 0.5,
        timeout: float = 5.0,
        lease: float | None = None,
        poll_interval: float = 0.5,
        batch_size: int = 200,
        max_in_flight: int = 64,
        db_timeout: float = 5.0,
    ) -> None:
        """``timeout`` bounds one send (connect to answer); ``lease`` (default timeout + 2 s) is how
        long a claimed callback is hidden from the other replicas, so it must be longer. At most
        ``max_in_flight`` sends run at once: the loop claims no more than it can send right away,
        so a callback never waits out its lease in a queue of this process."""
        lease = timeout + LEASE_MARGIN if lease is None else lease
        if lease <= timeout:
            raise ValueError("the lease must outlast a send's timeout")
        self._pool = pool
        self.webhook_url = webhook_url
        self._secret = secret
        self.delay = delay
        self.outcome = outcome
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.timeout = timeout
        self.lease = lease
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.db_timeout = db_timeout
        # As many connections as sends: a send never queues for a connection, eating its lease.
        # meshkit's lean client, made on first use inside the loop: httpx spent ~4 ms of CPU per
        # request with dozens of connections open, aiohttp about 120 us, in the process that also
        # answers the webhooks; this one about a third of aiohttp's.
        origin = urlsplit(webhook_url)
        self._origin = f"{origin.scheme}://{origin.netloc}"
        self._path = origin.path + (f"?{origin.query}" if origin.query else "")
        self._session: http1.Client | None = None
        self._plans: dict[str, tuple[Outcome, float | None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._inflight: dict[asyncio.Task[None], tuple[str, uuid.UUID]] = {}
        self._wake = asyncio.Event()
        self._wake_at = math.inf  # monotonic time the loop will look again; inf while it is awake
        self._full = False  # the loop waits for a send to finish
        self._closing = False
        self._delivered: list[str] = []  # references delivered, their marks not written yet
        self._marking: asyncio.Task[None] | None = None  # writes them after DELIVERED_GATHER
        # Counters (this replica's), for metrics and tests.
        self.sent_total = 0
        self.delivered_total = 0
        self.given_up_total = 0

    # --- test hooks --------------------------------------------------------------------------------

    def plan(self, order: str, outcome: Outcome, delay: float | None = None) -> None:
        """The next checkout of ``order`` ("orders/<id>") ends with ``outcome`` after ``delay``."""
        self._plans[order] = (outcome, delay)

    async def checkout(self, reference: str) -> SandboxCheckout | None:
        async with autocommit(self._pool, wait=self.db_timeout) as conn:
            cur = await conn.execute(
                f"SELECT {_CHECKOUT_COLUMNS} FROM sandbox_checkouts WHERE reference = %s", (reference,))
            row = await cur.fetchone()
        if row is None:
            return None
        (ref, pid, order, currency, units, nanos, outcome, event_id, created, due, attempts,
         delivered, given_up, cancelled, error) = row
        return SandboxCheckout(ref, pid, order, Money(currency, units, nanos), outcome, event_id, created,
                               due, attempts, delivered, given_up, cancelled, error)

    async def refund_of(self, idempotency_key: str) -> SandboxRefund | None:
        async with autocommit(self._pool, wait=self.db_timeout) as conn:
            cur = await conn.execute(
                f"SELECT {_REFUND_COLUMNS} FROM sandbox_refunds WHERE idempotency_key = %s",
                (idempotency_key,))
            row = await cur.fetchone()
        return _refund_of(row) if row else None

    async def refunds_of(self, reference: str) -> list[SandboxRefund]:
        async with autocommit(self._pool, wait=self.db_timeout) as conn:
            cur = await conn.execute(
                f"SELECT {_REFUND_COLUMNS} FROM sandbox_refunds WHERE reference = %s ORDER BY created_at",
                (reference,))
            return [_refund_of(r) for r in await cur.fetchall()]

    # --- Provider --------------------------------------------------------------------------------

    async def create_checkout(self, payment_id: uuid.UUID, order: str, amount: Money,
                              outcome: Outcome | None = None) -> str:
        reference = f"sbx_{payment_id.hex}"
        plan = self._plans.pop(order, None)
        planned, delay = plan if plan is not None else (None, None)
        chosen: Outcome = outcome or planned or self.outcome
        wait = self.delay if delay is None else delay
        try:
            async with autocommit(self._pool, wait=self.db_timeout) as conn:
                cur = await conn.execute(_INSERT, (
                    reference, payment_id, order, amount.currency_code, amount.units, amount.nanos,
                    chosen, f"evt_{uuid.uuid4().hex}",
                    None if chosen == "never" else timedelta(seconds=wait)))
                created = cur.rowcount == 1
        except (psycopg.Error, PoolTimeout) as exc:
            if plan is not None:
                self._plans.setdefault(order, plan)
            raise ProviderError(f"sandbox checkout failed: {exc}") from exc
        if not created:  # a retry of a checkout made before: the plan is for the next one
            if plan is not None:
                self._plans.setdefault(order, plan)
        elif chosen != "never":
            self._expect(wait)
        return reference

    async def cancel(self, reference: str) -> None:
        # A real PSP cannot stop a customer who is already paying: the sandbox keeps its callback,
        # so a late success still arrives (and is refunded), as it would in production.
        try:
            async with autocommit(self._pool, wait=self.db_timeout) as conn:
                await conn.execute(_CANCEL, (reference,))
        except (psycopg.Error, PoolTimeout):
            log.warning("sandbox cancel not recorded", exc_info=True, extra={"reference": reference})

    async def refund(self, reference: str, amount: Money, idempotency_key: str) -> str:
        try:
            async with autocommit(self._pool, wait=self.db_timeout) as conn:
                cur = await conn.execute(_REFUND, {
                    "key": idempotency_key, "id": f"sbx_re_{uuid.uuid4().hex}", "reference": reference,
                    "currency": amount.currency_code, "units": amount.units, "nanos": amount.nanos})
                row = await cur.fetchone()
                created = row is not None
                if row is None:  # asked before: the first refund's id (a new snapshot sees it)
                    cur = await conn.execute("SELECT refund_id FROM sandbox_refunds "
                                             "WHERE idempotency_key = %s", (idempotency_key,))
                    row = await cur.fetchone()
        except (psycopg.Error, PoolTimeout) as exc:
            raise ProviderError(f"sandbox refund failed: {exc}") from exc
        if row is None:  # neither made nor asked before: the reference is none of the sandbox's
            raise ProviderRefused(f"sandbox refund refused: no charge {reference}")
        if created:
            log.info("sandbox refund", extra={"reference": reference, "amount": amount.text(),
                                              "currency": amount.currency_code})
        return str(row[0])

    # --- the delivery loop -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start delivering: callbacks left by an earlier process are resumed at once."""
        if self._task is not None:
            raise RuntimeError("sandbox provider already started")
        self._closing = False
        self._task = asyncio.create_task(self._run(), name="sandbox-delivery")

    def _expect(self, seconds: float) -> None:
        """A callback is due in ``seconds``: wake the loop if it would look later than that."""
        if time.monotonic() + seconds < self._wake_at:
            self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        self._wake_at = time.monotonic() + seconds
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake_at = math.inf

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            self._wake.clear()
            room = min(self.batch_size, self.max_in_flight - len(self._inflight))
            if room <= 0:
                self._full = True  # the next send to finish wakes the loop
                await self._sleep(self.poll_interval)
                continue
            try:
                claimed, next_in = await self._claim(room)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                backoff = min(0.5 * 2 ** (failures - 1), 10.0)
                log.warning("sandbox delivery pass failed; retrying",
                            extra={"error": repr(exc), "retry_in_s": backoff})
                await self._sleep(backoff)
                continue
            for c in claimed:
                task = asyncio.create_task(self._send(c), name=f"sandbox-{c.reference}")
                self._inflight[task] = (c.reference, c.claim)
                task.add_done_callback(self._forget)
            if len(claimed) >= room:
                continue  # likely more due: no sleep
            wait = self.poll_interval if next_in is None else min(self.poll_interval, next_in)
            await self._sleep(max(wait, MIN_WAIT))

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        if self._full:
            self._full = False
            self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("sandbox send crashed", exc_info=task.exception())

    async def _claim(self, limit: int) -> tuple[list[_Claimed], float | None]:
        claim = uuid.uuid4()
        async with autocommit(self._pool, wait=self.db_timeout) as conn:
            cur = await conn.execute(_CLAIM, (limit, timedelta(seconds=self.lease), claim))
            rows = await cur.fetchall()
            cur = await conn.execute(_NEXT_DUE)
            nxt = await cur.fetchone()
        claimed = [_Claimed(ref, event_id, cast(Outcome, outcome), Money(currency, units, nanos), attempts,
                            claim)
                   for ref, event_id, outcome, currency, units, nanos, attempts in rows]
        return claimed, (None if nxt is None or nxt[0] is None else float(nxt[0]))

    def _http(self) -> http1.Client:
        if self._session is None:
            self._session = http1.Client(self._origin, limit=self.max_in_flight, timeout=self.timeout,
                                         connect_timeout=self.timeout, user_agent="ticketping-sandbox-psp")
        return self._session

    async def _send(self, c: _Claimed) -> None:
        if c.attempts > self.max_attempts:
            # The last attempt's sender died before it learned the answer: no more sends.
            self.given_up_total += 1
            log.error("sandbox webhook given up", extra={"reference": c.reference, "attempt": c.attempts})
            await self._settle(_GIVE_UP, ("attempts exhausted", c.reference, c.claim), c)
            return
        kind = SUCCEEDED_TYPE if c.outcome == "approve" else FAILED_TYPE
        body = webhook_body(c.event_id, kind, c.reference, c.amount,
                            "" if kind == SUCCEEDED_TYPE else "CARD_DECLINED")
        headers = {SIGNATURE_HEADER: sign(self._secret, int(time.time()), body),
                   "content-type": "application/json"}
        self.sent_total += 1
        error = ""
        try:
            async with asyncio.timeout(self.timeout):  # the whole send, well inside the lease
                resp = await self._http().request("POST", self._path, body=body, headers=headers)
                status, text = resp.status, resp.body.decode("utf-8", "replace")
            if not 200 <= status < 300:
                error = f"HTTP {status}: {text[:200]}"
                log.warning("sandbox webhook refused; will retry",
                            extra={"reference": c.reference, "status": status,
                                   "body": text[:300], "attempt": c.attempts})
        except (http1.HttpError, TimeoutError) as exc:
            error = repr(exc)
            log.warning("sandbox webhook failed; will retry",
                        extra={"reference": c.reference, "error": error, "attempt": c.attempts})
        if not error:
            self.delivered_total += 1
            self._delivered.append(c.reference)
            if self._marking is None:
                self._marking = asyncio.create_task(self._mark_delivered(), name="sandbox-delivered")
        elif c.attempts >= self.max_attempts:
            self.given_up_total += 1
            log.error("sandbox webhook given up", extra={"reference": c.reference, "attempt": c.attempts})
            await self._settle(_GIVE_UP, (error[:1000], c.reference, c.claim), c)
        else:
            backoff = min(self.retry_backoff * 2 ** (c.attempts - 1), MAX_BACKOFF)
            await self._settle(_RETRY, (timedelta(seconds=backoff), error[:1000], c.reference, c.claim), c)
            self._expect(backoff)

    async def _mark_delivered(self) -> None:
        """Write the delivered marks gathered meanwhile, in one statement."""
        await asyncio.sleep(DELIVERED_GATHER)
        references, self._delivered, self._marking = self._delivered, [], None
        try:
            async with autocommit(self._pool, wait=self.db_timeout) as conn:
                await conn.execute(_DELIVERED, (references,))
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("sandbox deliveries not recorded; those callbacks will be sent again",
                        extra={"count": len(references), "error": repr(exc)})

    async def _settle(self, sql: str, params: tuple[Any, ...], c: _Claimed) -> None:
        """Record a send's result. If that fails the lease runs out and the callback is sent again."""
        try:
            async with autocommit(self._pool, wait=self.db_timeout) as conn:
                await conn.execute(sql, params)
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("sandbox result not recorded; the callback will be sent again",
                        extra={"reference": c.reference, "error": repr(exc)})

    async def close(self) -> None:
        """Stop delivering. Interrupted sends are released for the next replica to send at once."""
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:  # let a claim in progress finish (its sends are released below)
            _, pending = await asyncio.wait([task], timeout=self.db_timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(task, return_exceptions=True)
        inflight = dict(self._inflight)
        for t in inflight:
            t.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)
        if self._marking is not None:  # what was delivered is recorded, not sent again
            await asyncio.gather(self._marking, return_exceptions=True)
        released = [held for t, held in inflight.items() if t.cancelled()]
        if released:
            try:
                async with autocommit(self._pool, wait=self.db_timeout) as conn:
                    await conn.execute(_RELEASE, ([r for r, _ in released], [c for _, c in released]))
            except (psycopg.Error, PoolTimeout):
                log.warning("sandbox claims not released; they are sent again when their lease ends",
                            exc_info=True, extra={"count": len(released)})
        if self._session is not None:
            await self._session.close()
            self._session = None
