"""The payment provider (PSP) adapter, and the built-in sandbox provider.

A provider opens a checkout for a payment (idempotent on the payment id), later tells us the
outcome through a signed webhook, cancels an abandoned checkout, and refunds captured money
(idempotent on a key: one refund per payment, however often it is asked).

:class:`SandboxProvider` behaves like a real PSP seen from outside: after a delay it POSTs a signed
callback to the webhook URL (through the edge, like any provider), re-sends it with backoff until
it gets a 2xx, and re-sends the same event id each time. The outcome is per payment: ``approve``,
``decline`` or ``never`` (no callback at all), from the settings' default, a test hook
(:meth:`SandboxProvider.plan`) or, when enabled, the caller's ``x-sandbox-outcome`` metadata.
Its callbacks live in this process: a restart of svc_payment loses the ones not yet sent (the
order then expires and the payment is cancelled: no money moved).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Literal, Protocol

import httpx

from ..domain.model import FAILED_TYPE, SIGNATURE_HEADER, SUCCEEDED_TYPE, Money, sign, webhook_body

log = logging.getLogger(__name__)

Outcome = Literal["approve", "decline", "never"]
OUTCOMES: tuple[str, ...] = ("approve", "decline", "never")


class ProviderError(RuntimeError):
    """The provider could not be reached or refused the call; the caller retries later."""


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


@dataclass
class _Checkout:
    reference: str
    amount: Money
    outcome: Outcome
    task: asyncio.Task[None] | None = None
    delivered: bool = False
    attempts: int = 0


class SandboxProvider:
    name = "sandbox"

    def __init__(
        self,
        webhook_url: str,
        secret: bytes,
        *,
        delay: float = 1.0,
        outcome: Outcome = "approve",
        max_attempts: int = 8,
        retry_backoff: float = 0.5,
        timeout: float = 5.0,
    ) -> None:
        self.webhook_url = webhook_url
        self._secret = secret
        self.delay = delay
        self.outcome = outcome
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self._client = httpx.AsyncClient(timeout=timeout)
        self._checkouts: dict[str, _Checkout] = {}
        self._plans: dict[str, tuple[Outcome, float | None]] = {}
        self.refunds: dict[str, tuple[str, Money]] = {}  # idempotency key -> (refund id, amount)
        self.cancelled: set[str] = set()

    # --- test hook -------------------------------------------------------------------------------

    def plan(self, order: str, outcome: Outcome, delay: float | None = None) -> None:
        """The next checkout of ``order`` ("orders/<id>") ends with ``outcome`` after ``delay``."""
        self._plans[order] = (outcome, delay)

    def checkout(self, reference: str) -> _Checkout | None:
        return self._checkouts.get(reference)

    # --- Provider --------------------------------------------------------------------------------

    async def create_checkout(self, payment_id: uuid.UUID, order: str, amount: Money,
                              outcome: Outcome | None = None) -> str:
        reference = f"sbx_{payment_id.hex}"
        if reference in self._checkouts:
            return reference
        planned, delay = self._plans.pop(order, (None, None))
        chosen: Outcome = outcome or planned or self.outcome
        co = _Checkout(reference, amount, chosen)
        self._checkouts[reference] = co
        if chosen != "never":
            co.task = asyncio.create_task(
                self._deliver(co, self.delay if delay is None else delay), name=f"sandbox-{reference}")
        return reference

    async def cancel(self, reference: str) -> None:
        # A real PSP cannot stop a customer who is already paying: the sandbox keeps its callback,
        # so a late success still arrives (and is refunded), as it would in production.
        self.cancelled.add(reference)

    async def refund(self, reference: str, amount: Money, idempotency_key: str) -> str:
        found = self.refunds.get(idempotency_key)
        if found is None:
            found = (f"sbx_re_{uuid.uuid4().hex}", amount)
            self.refunds[idempotency_key] = found
            log.info("sandbox refund", extra={"reference": reference, "amount": amount.text(),
                                              "currency": amount.currency_code})
        return found[0]

    # --- the callback ------------------------------------------------------------------------------

    async def _deliver(self, co: _Checkout, delay: float) -> None:
        await asyncio.sleep(delay)
        kind = SUCCEEDED_TYPE if co.outcome == "approve" else FAILED_TYPE
        body = webhook_body(f"evt_{uuid.uuid4().hex}", kind, co.reference, co.amount,
                            "" if kind == SUCCEEDED_TYPE else "CARD_DECLINED")
        backoff = self.retry_backoff
        while co.attempts < self.max_attempts:
            co.attempts += 1
            headers = {SIGNATURE_HEADER: sign(self._secret, int(time.time()), body),
                       "content-type": "application/json"}
            try:
                resp = await self._client.post(self.webhook_url, content=body, headers=headers)
                if 200 <= resp.status_code < 300:
                    co.delivered = True
                    return
                log.warning("sandbox webhook refused; will retry",
                            extra={"reference": co.reference, "status": resp.status_code,
                                   "body": resp.text[:300], "attempt": co.attempts})
            except httpx.HTTPError as exc:
                log.warning("sandbox webhook failed; will retry",
                            extra={"reference": co.reference, "error": repr(exc), "attempt": co.attempts})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
        log.error("sandbox webhook given up", extra={"reference": co.reference})

    async def close(self) -> None:
        tasks = [co.task for co in self._checkouts.values() if co.task is not None and not co.task.done()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self._client.aclose()
