"""Payment's tables (see migrations/): payments, provider_events."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from ..domain.model import Money, Payment, PaymentState

Conn = psycopg.AsyncConnection[Any]

_COLUMNS = ("payment_id, order_id, hold, user_id, state, currency_code, units, nanos, provider, "
            "provider_reference, failure_reason, create_time, update_time")


def _payment(row: TupleRow) -> Payment:
    (pid, oid, hold, user, state, cur, units, nanos, provider, ref, reason, created, updated) = row
    return Payment(pid, oid, hold, user, PaymentState(state), Money(cur, units, nanos), provider,
                   ref, reason, created, updated)


async def insert_payment(conn: Conn, p: Payment, request_id: uuid.UUID) -> bool:
    """Insert ``p``; False if the request id was used before or the order has a live payment."""
    try:
        async with conn.transaction():  # a savepoint: the caller's transaction survives a conflict
            cur = await conn.execute(
                f"""INSERT INTO payments ({_COLUMNS}, request_id)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                    ON CONFLICT (user_id, request_id) DO NOTHING""",
                (p.payment_id, p.order_id, p.hold, p.user_id, p.state.value, p.amount.currency_code,
                 p.amount.units, p.amount.nanos, p.provider, p.provider_reference, p.failure_reason,
                 p.create_time, p.update_time, request_id))
            return cur.rowcount == 1
    except psycopg.errors.UniqueViolation:  # payments_one_live_per_order
        return False


async def by_request(conn: Conn, user_id: str, request_id: uuid.UUID) -> Payment | None:
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM payments WHERE user_id = %s AND request_id = %s",
        (user_id, request_id))
    row = await cur.fetchone()
    return _payment(row) if row else None


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


async def live_for_order(conn: Conn, order_id: uuid.UUID) -> Payment | None:
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM payments WHERE order_id = %s AND state IN ('PENDING', 'SUCCEEDED')",
        (order_id,))
    row = await cur.fetchone()
    return _payment(row) if row else None


async def for_order(conn: Conn, order_id: uuid.UUID) -> list[Payment]:
    """Every payment of the order, locked, oldest first."""
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM payments WHERE order_id = %s ORDER BY create_time, payment_id "
        "FOR UPDATE", (order_id,))
    return [_payment(r) for r in await cur.fetchall()]


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


async def order_ended(conn: Conn, order_id: uuid.UUID) -> str | None:
    cur = await conn.execute("SELECT state FROM ended_orders WHERE order_id = %s", (order_id,))
    row = await cur.fetchone()
    return str(row[0]) if row else None


async def mark_order_ended(conn: Conn, order_id: uuid.UUID, state: str) -> None:
    await conn.execute("INSERT INTO ended_orders (order_id, state) VALUES (%s, %s) "
                       "ON CONFLICT (order_id) DO NOTHING", (order_id, state))
