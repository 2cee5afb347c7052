"""Payment's tables (see migrations/): payments, provider_events, ended_orders, unmatched_callbacks."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from meshkit.outbox import Outboxed

from ..domain.model import Money, Payment, PaymentState

Conn = psycopg.AsyncConnection[Any]

_COLUMNS = ("payment_id, order_id, hold, user_id, state, currency_code, units, nanos, provider, "
            "provider_reference, failure_reason, create_time, update_time")


def _payment(row: TupleRow) -> Payment:
    (pid, oid, hold, user, state, cur, units, nanos, provider, ref, reason, created, updated) = row
    return Payment(pid, oid, hold, user, PaymentState(state), Money(cur, units, nanos), provider,
                   ref, reason, created, updated)


async def by_request_or_live(conn: Conn, user_id: str, request_id: uuid.UUID, order_id: uuid.UUID
                             ) -> tuple[Payment | None, Payment | None, Payment | None]:
    """(the payment this request made, the order's live one: PENDING or SUCCEEDED, a FAILED one of
    the order), in one read."""
    cur = await conn.execute(
        f"""SELECT {_COLUMNS}, user_id = %s AND request_id = %s FROM payments
            WHERE (user_id = %s AND request_id = %s)
               OR (order_id = %s AND state IN ('PENDING', 'SUCCEEDED', 'FAILED'))""",
        (user_id, request_id, user_id, request_id, order_id))
    made = live = failed = None
    for row in await cur.fetchall():
        p = _payment(row[:-1])
        if row[-1]:
            made = p
        if p.order_id == order_id and p.state in (PaymentState.PENDING, PaymentState.SUCCEEDED):
            live = p
        elif p.order_id == order_id and p.state is PaymentState.FAILED:
            failed = p
    return made, live, failed


async def insert_unless_ended(conn: Conn, p: Payment, request_id: uuid.UUID) -> tuple[str | None, bool]:
    """Insert ``p`` unless its order is over for payment or the request id was used before: (why
    the order is over: its end state in ended_orders, or PAYMENT_FAILED if a payment of it failed;
    whether inserted). One statement (autocommit: one round trip), which first takes the order's
    lock (lock_order's), so its insert sees every end marked before (migration 0006). A payment
    that is not PENDING (the record of a dropped checkout) is inserted whether or not the order
    is over. Raises psycopg.errors.UniqueViolation (nothing inserted) if the order has a live
    payment already (payments_one_live_per_order)."""
    cur = await conn.execute(
        "SELECT ended, inserted FROM insert_payment_unless_ended(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
        "%s, %s, %s, %s)",
        (p.payment_id, p.order_id, p.hold, p.user_id, p.state.value, p.amount.currency_code,
         p.amount.units, p.amount.nanos, p.provider, p.provider_reference, p.failure_reason,
         p.create_time, p.update_time, request_id))
    row = await cur.fetchone()
    assert row is not None
    return (None if row[0] is None else str(row[0])), bool(row[1])


async def get(conn: Conn, payment_id: uuid.UUID, *, lock: bool = False) -> Payment | None:
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM payments WHERE payment_id = %s" + (" FOR UPDATE" if lock else ""),
        (payment_id,))
    row = await cur.fetchone()
    return _payment(row) if row else None


async def by_reference(conn: Conn, reference: str, *, lock: bool = False) -> Payment | None:
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM payments WHERE provider_reference = %s"
        + (" FOR UPDATE" if lock else ""), (reference,))
    row = await cur.fetchone()
    return _payment(row) if row else None


async def for_order(conn: Conn, order_id: uuid.UUID) -> list[Payment]:
    """Every payment of the order, locked, oldest first."""
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM payments WHERE order_id = %s ORDER BY create_time, payment_id "
        "FOR UPDATE", (order_id,))
    return [_payment(r) for r in await cur.fetchall()]


async def has_other_payment(conn: Conn, order_id: uuid.UUID, payment_id: uuid.UUID) -> bool:
    """Whether the order has a payment besides this one (a read: no lock)."""
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM payments WHERE order_id = %s AND payment_id <> %s)",
        (order_id, payment_id))
    row = await cur.fetchone()
    return bool(row and row[0])


async def for_hold(conn: Conn, hold: str) -> list[Payment]:
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM payments WHERE hold = %s ORDER BY create_time, payment_id "
        "FOR UPDATE", (hold,))
    return [_payment(r) for r in await cur.fetchall()]


async def set_state(conn: Conn, payment_id: uuid.UUID, state: PaymentState, reason: str,
                    now: datetime, refund_reference: str | None = None) -> Payment:
    cur = await conn.execute(
        f"""UPDATE payments SET state = %s, failure_reason = %s, update_time = %s,
                   refund_reference = COALESCE(%s, refund_reference)
            WHERE payment_id = %s RETURNING {_COLUMNS}""",
        (state.value, reason, now, refund_reference, payment_id))
    row = await cur.fetchone()
    assert row is not None
    return _payment(row)


async def apply_callback(conn: Conn, before: Payment, after: Payment, provider_event: str,
                         event_type: str, outboxed: Outboxed) -> bool:
    """Apply a provider's callback in one statement (autocommit): the payment moves from its state
    as read (``before``) to ``after`` (state, reason, update time), the callback is recorded and
    the change's event is added to the outbox. False (nothing written) if the payment's state is
    no longer ``before``'s or the callback was recorded before. Raises
    psycopg.errors.UniqueViolation (nothing written) if it was recorded meanwhile."""
    cur = await conn.execute(
        f"""WITH p AS (UPDATE payments SET state = %(state)s, failure_reason = %(reason)s,
                                           update_time = %(now)s
                       WHERE payment_id = %(payment)s AND state = %(from)s
                         AND NOT EXISTS (SELECT 1 FROM provider_events
                                         WHERE provider = %(provider)s AND event_id = %(event)s)
                       RETURNING payment_id),
                 e AS (INSERT INTO provider_events (provider, event_id, payment_id, type)
                       SELECT %(provider)s, %(event)s, payment_id, %(type)s FROM p),
                 ob AS ({outboxed.cte("p")})
            SELECT (SELECT count(*) FROM p), {outboxed.notified("ob", conn)}""",
        {"state": after.state.value, "reason": after.failure_reason, "now": after.update_time,
         "payment": before.payment_id, "from": before.state.value, "provider": before.provider,
         "event": provider_event, "type": event_type, **outboxed.params})
    row = await cur.fetchone()
    assert row is not None
    outboxed.sent(row[-1])
    return row[0] == 1


async def record_provider_event(conn: Conn, provider: str, event_id: str, payment_id: uuid.UUID,
                                type_: str) -> bool:
    """Remember a processed callback; False if it was processed before (a replay)."""
    cur = await conn.execute(
        """INSERT INTO provider_events (provider, event_id, payment_id, type)
           VALUES (%s, %s, %s, %s) ON CONFLICT (provider, event_id) DO NOTHING""",
        (provider, event_id, payment_id, type_))
    return cur.rowcount == 1


async def lock_order(conn: Conn, order_id: uuid.UUID) -> None:
    """Serialize, per order, payment creation against booking's "order ended" events."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (str(order_id),))


async def mark_order_ended(conn: Conn, order_id: uuid.UUID, state: str) -> None:
    await conn.execute("INSERT INTO ended_orders (order_id, state) VALUES (%s, %s) "
                       "ON CONFLICT (order_id) DO NOTHING", (order_id, state))


# --- success callbacks no payment had (migration 0004) ------------------------------------------


@dataclass(frozen=True)
class Unmatched:
    provider: str
    reference: str
    captured: Money


async def record_unmatched(conn: Conn, provider: str, reference: str, event_id: str, captured: Money) -> None:
    await conn.execute(
        """INSERT INTO unmatched_callbacks (provider, reference, event_id, currency_code, units, nanos)
           VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (provider, reference) DO NOTHING""",
        (provider, reference, event_id, captured.currency_code, captured.units, captured.nanos))


async def forget_matched(conn: Conn) -> int:
    """Unmatched callbacks whose payment has been written since (the usual race): nothing to do."""
    cur = await conn.execute(
        """DELETE FROM unmatched_callbacks u WHERE refunded_at IS NULL
             AND EXISTS (SELECT 1 FROM payments p WHERE p.provider_reference = u.reference)""")
    return cur.rowcount


async def due_unmatched(conn: Conn, older_than_seconds: float, limit: int) -> list[Unmatched]:
    """Not refunded, first seen longer ago than that, still no payment; locked (SKIP LOCKED: each
    one goes to one replica)."""
    cur = await conn.execute(
        """SELECT provider, reference, currency_code, units, nanos FROM unmatched_callbacks u
            WHERE refunded_at IS NULL AND refusal = '' AND first_seen < now() - make_interval(secs => %s)
              AND NOT EXISTS (SELECT 1 FROM payments p WHERE p.provider_reference = u.reference)
            ORDER BY first_seen LIMIT %s FOR UPDATE SKIP LOCKED""",
        (older_than_seconds, limit))
    return [Unmatched(r[0], r[1], Money(r[2], r[3], r[4])) for r in await cur.fetchall()]


async def mark_unmatched_refused(conn: Conn, u: Unmatched, reason: str) -> None:
    await conn.execute("UPDATE unmatched_callbacks SET refusal = %s WHERE provider = %s AND reference = %s",
                       (reason[:1000] or "refused", u.provider, u.reference))


async def mark_unmatched_refunded(conn: Conn, u: Unmatched, refund_reference: str) -> None:
    await conn.execute(
        """UPDATE unmatched_callbacks SET refund_reference = %s, refunded_at = now()
            WHERE provider = %s AND reference = %s""", (refund_reference, u.provider, u.reference))
