"""Booking's tables (see migrations/): events, seats, holds, orders, sold_seats."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from meshkit.db import autocommit
from meshkit.outbox import Outboxed
from meshkit.seats import SeatMap, Section

from ..domain.model import Hold, HoldState, Layout, Money, Order, OrderState, PriceTier

Conn = psycopg.AsyncConnection[Any]


# --- events and seats ------------------------------------------------------------------------


async def store_layout(conn: Conn, layout: Layout) -> bool:
    """Insert the event and every seat once; False (nothing written) if it was there already."""
    cur = await conn.execute(
        """INSERT INTO events (event_id, title, seat_limit_per_fan, currency_code, seat_count,
                               seat_ranges, price_tiers, sales_end)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (event_id) DO NOTHING""",
        (layout.event_id, layout.title, layout.seat_limit_per_fan, layout.currency_code,
         layout.seat_count,
         Jsonb([{"section": s.name, "rows": s.rows, "seats_per_row": s.seats_per_row, "tier": s.tier}
                for s in layout.seat_map.sections]),
         Jsonb([{"name": t.name, "currency_code": t.price.currency_code, "units": t.price.units,
                 "nanos": t.price.nanos} for t in layout.tiers]), layout.sales_end),
    )
    if cur.rowcount == 0:
        return False
    prices = {t.name: t.price for t in layout.tiers}
    async with conn.cursor().copy(
        'COPY seats (event_id, seat_id, section, "row", number, tier, price_units, price_nanos) '
        "FROM STDIN"
    ) as copy:
        for seat in layout.seat_map.seats():
            p = prices[seat.tier]
            await copy.write_row((layout.event_id, seat.seat_id, seat.section, seat.row, seat.number,
                                  seat.tier, p.units, p.nanos))
    return True


def _layout(row: TupleRow) -> Layout:
    event_id, title, limit, ranges, tiers, sales_end = row
    return Layout(
        event_id=event_id,
        title=title,
        seat_limit_per_fan=limit,
        seat_map=SeatMap(tuple(Section(r["section"], r["rows"], r["seats_per_row"], r["tier"])
                               for r in ranges)),
        tiers=tuple(PriceTier(t["name"], Money(t["currency_code"], t["units"], t["nanos"]))
                    for t in tiers),
        sales_end=sales_end,
    )


async def load_layout(pool: AsyncConnectionPool, event_id: str) -> Layout | None:
    async with autocommit(pool) as conn:
        cur = await conn.execute(
            "SELECT event_id, title, seat_limit_per_fan, seat_ranges, price_tiers, sales_end FROM events "
            "WHERE event_id = %s", (event_id,))
        row = await cur.fetchone()
    return _layout(row) if row else None


async def events_with_live_holds(pool: AsyncConnectionPool) -> list[str]:
    async with autocommit(pool) as conn:
        cur = await conn.execute(
            "SELECT DISTINCT event_id FROM holds WHERE state IN ('ACTIVE', 'ORDERED')")
        return [r[0] for r in await cur.fetchall()]


async def lock_for_build(conn: Conn, event_id: str) -> str | None:
    """Hold the event's row FOR UPDATE until the transaction ends (a build of its live state);
    its current live_stamp, None if there is no such event.

    Every write the build's snapshot must see (a hold's row, sold seats, a release) holds the row
    FOR KEY SHARE (share_event, or the foreign key of its insert): it either committed before the
    snapshot or waits for the build to be written, stamp and all."""
    cur = await conn.execute("SELECT live_stamp FROM events WHERE event_id = %s FOR UPDATE",
                             (event_id,))
    row = await cur.fetchone()
    return row[0] if row else None


async def share_event(conn: Conn, event_id: str) -> str | None:
    """Hold the event's row FOR KEY SHARE until the transaction ends (no build meanwhile, see
    lock_for_build); the live_stamp of the current build, None if there is no such event."""
    cur = await conn.execute("SELECT live_stamp FROM events WHERE event_id = %s FOR KEY SHARE",
                             (event_id,))
    row = await cur.fetchone()
    return row[0] if row else None


async def set_live_stamp(conn: Conn, event_id: str, stamp: str) -> None:
    await conn.execute("UPDATE events SET live_stamp = %s WHERE event_id = %s", (stamp, event_id))


async def live_state(
    conn: Conn, event_id: str
) -> tuple[list[tuple[str, str]], list[tuple[uuid.UUID, str, list[str], datetime, uuid.UUID]],
           dict[str, int]]:
    """(sold seats with their buyer, live holds, seats bought per user), read under
    lock_for_build: nothing that changes them (hold, order, sale, release, expiry) runs meanwhile."""
    cur = await conn.execute(
        "SELECT s.seat_id, o.user_id FROM sold_seats s JOIN orders o USING (order_id) "
        "WHERE s.event_id = %s", (event_id,))
    sold = [(r[0], r[1]) for r in await cur.fetchall()]
    cur = await conn.execute(
        "SELECT hold_id, user_id, seat_ids, expire_time, request_id FROM holds "
        "WHERE event_id = %s AND state IN ('ACTIVE', 'ORDERED')", (event_id,))
    holds = [(r[0], r[1], list(r[2]), r[3], r[4]) for r in await cur.fetchall()]
    bought: dict[str, int] = {}
    for _, user in sold:
        bought[user] = bought.get(user, 0) + 1
    return sold, holds, bought


# --- holds -----------------------------------------------------------------------------------

_HOLD_COLS = "hold_id, event_id, user_id, seat_ids, expire_time, create_time, state"


def _hold(row: TupleRow) -> Hold:
    return Hold(row[0], row[1], row[2], tuple(row[3]), row[4], row[5], HoldState(row[6]))


async def insert_hold(conn: Conn, hold: Hold, request_id: uuid.UUID) -> bool:
    cur = await conn.execute(
        f"INSERT INTO holds ({_HOLD_COLS}, request_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT DO NOTHING",
        (hold.hold_id, hold.event_id, hold.user_id, list(hold.seat_ids), hold.expire_time,
         hold.create_time, hold.state.value, request_id))
    return cur.rowcount == 1


async def write_hold(conn: Conn, hold: Hold, request_id: uuid.UUID, stamp: str,
                     created: Outboxed) -> tuple[str | None, bool]:
    """Write the hold down with its HoldCreated, in one statement (autocommit), if the event's
    live state is still the one its script ran on (``stamp``); (the live stamp, whether written).

    The event's row is held FOR KEY SHARE meanwhile: a build waits for it, and one that committed
    first shows its new stamp (a locking read sees the latest row). Not written with the stamp
    current: a retry of the request (another hold id) wrote its hold first."""
    cur = await conn.execute(
        f"""WITH ev AS (SELECT live_stamp FROM events WHERE event_id = %(event)s FOR KEY SHARE),
                 h AS (INSERT INTO holds ({_HOLD_COLS}, request_id)
                       SELECT %(hold)s, %(event)s, %(user)s, %(seats)s, %(expire)s, %(create)s,
                              %(state)s, %(request)s
                       FROM ev WHERE live_stamp = %(stamp)s
                       ON CONFLICT DO NOTHING RETURNING hold_id),
                 ob AS ({created.cte("h")})
            SELECT (SELECT live_stamp FROM ev), (SELECT count(*) FROM h), {created.notified("ob", conn)}""",
        {"event": hold.event_id, "hold": hold.hold_id, "user": hold.user_id,
         "seats": list(hold.seat_ids), "expire": hold.expire_time, "create": hold.create_time,
         "state": hold.state.value, "request": request_id, "stamp": stamp, **created.params})
    row = await cur.fetchone()
    assert row is not None
    created.sent(row[-1])
    return row[0], row[1] == 1


async def get_hold(conn: Conn, hold_id: uuid.UUID, *, lock: bool = False) -> Hold | None:
    cur = await conn.execute(
        f"SELECT {_HOLD_COLS} FROM holds WHERE hold_id = %s" + (" FOR UPDATE" if lock else ""),
        (hold_id,))
    row = await cur.fetchone()
    return _hold(row) if row else None


async def hold_by_request(conn: Conn, event_id: str, user_id: str, request_id: uuid.UUID
                          ) -> Hold | None:
    cur = await conn.execute(
        f"SELECT {_HOLD_COLS} FROM holds WHERE event_id = %s AND user_id = %s AND request_id = %s",
        (event_id, user_id, request_id))
    row = await cur.fetchone()
    return _hold(row) if row else None


async def lock_hold_id(conn: Conn, hold_id: uuid.UUID) -> None:
    """Serialize, per hold id, until the transaction ends, a retry writing down the hold its
    request's first attempt left in Redis alone, and whoever takes back a hold that has no row
    (that first attempt, the sweeper): the row may not exist yet, hence an advisory lock."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"hold:{hold_id}",))


async def set_hold_state(conn: Conn, hold_id: uuid.UUID, state: HoldState) -> None:
    await conn.execute("UPDATE holds SET state = %s, update_time = now() WHERE hold_id = %s",
                       (state.value, hold_id))


# --- orders ----------------------------------------------------------------------------------

_ORDER_COLS = ("order_id, event_id, hold_id, user_id, seat_ids, currency_code, amount_units, "
               "amount_nanos, state, expire_time, payment, create_time, update_time")


def _order(row: TupleRow) -> Order:
    return Order(row[0], row[1], row[2], row[3], tuple(row[4]), Money(row[5], row[6], row[7]),
                 OrderState(row[8]), row[9], row[10], row[11], row[12])


async def insert_order(conn: Conn, order: Order, request_id: uuid.UUID) -> None:
    await conn.execute(
        f"INSERT INTO orders ({_ORDER_COLS}, request_id) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (order.order_id, order.event_id, order.hold_id, order.user_id, list(order.seat_ids),
         order.amount.currency_code, order.amount.units, order.amount.nanos, order.state.value,
         order.expire_time, order.payment, order.create_time, order.update_time, request_id))


async def order_live_hold(conn: Conn, order: Order, request_id: uuid.UUID, created: Outboxed
                          ) -> bool:
    """Order a hold that was live when read, in one statement (autocommit): the hold ORDERED if
    it still is ACTIVE, the fan's and the event's, with these seats, before its deadline; then the
    order and its OrderCreated. False (nothing written) if the hold is not so any more.
    Raises psycopg.errors.UniqueViolation if the request id was used before (nothing written)."""
    cur = await conn.execute(
        f"""WITH h AS (UPDATE holds SET state = 'ORDERED', update_time = now()
                       WHERE hold_id = %(hold)s AND user_id = %(user)s AND event_id = %(event)s
                         AND state = 'ACTIVE' AND expire_time > %(now)s AND expire_time = %(expire)s
                         AND seat_ids = %(seats)s
                       RETURNING hold_id),
                 o AS (INSERT INTO orders ({_ORDER_COLS}, request_id)
                       SELECT %(order)s, %(event)s, hold_id, %(user)s, %(seats)s, %(currency)s,
                              %(units)s, %(nanos)s, %(state)s, %(expire)s, %(payment)s, %(now)s,
                              %(now)s, %(request)s FROM h
                       RETURNING order_id),
                 ob AS ({created.cte("o")})
            SELECT (SELECT count(*) FROM o), {created.notified("ob", conn)}""",
        {"hold": order.hold_id, "user": order.user_id, "event": order.event_id,
         "now": order.create_time, "expire": order.expire_time, "seats": list(order.seat_ids),
         "order": order.order_id, "currency": order.amount.currency_code,
         "units": order.amount.units, "nanos": order.amount.nanos, "state": order.state.value,
         "payment": order.payment, "request": request_id, **created.params})
    row = await cur.fetchone()
    assert row is not None
    created.sent(row[-1])
    return row[0] == 1


async def sell_pending(conn: Conn, order: Order, paid_at: datetime, confirmed: Outboxed) -> bool:
    """Sell a PENDING_PAYMENT order to its payment in one statement (autocommit): the order
    CONFIRMED (``order`` is it as confirmed: its payment and update time), its seats in
    sold_seats, its hold SOLD, OrderConfirmed. False (nothing written) if the order is no longer
    pending or was not paid before its deadline (``paid_at``). Raises
    psycopg.errors.UniqueViolation (nothing written) if a seat is sold already."""
    cur = await conn.execute(
        f"""WITH o AS (UPDATE orders SET state = 'CONFIRMED', payment = %(payment)s,
                                         update_time = %(now)s
                       WHERE order_id = %(order)s AND state = 'PENDING_PAYMENT'
                         AND expire_time > %(paid)s
                       RETURNING event_id, seat_ids, order_id, hold_id),
                 s AS (INSERT INTO sold_seats (event_id, seat_id, order_id)
                       SELECT event_id, unnest(seat_ids), order_id FROM o),
                 h AS (UPDATE holds SET state = 'SOLD', update_time = %(now)s
                       WHERE hold_id = (SELECT hold_id FROM o)),
                 ob AS ({confirmed.cte("o")})
            SELECT (SELECT count(*) FROM o), {confirmed.notified("ob", conn)}""",
        {"payment": order.payment, "now": order.update_time, "paid": paid_at, "order": order.order_id,
         **confirmed.params})
    row = await cur.fetchone()
    assert row is not None
    confirmed.sent(row[-1])
    return row[0] == 1


async def get_order(conn: Conn, order_id: uuid.UUID, *, lock: bool = False) -> Order | None:
    cur = await conn.execute(
        f"SELECT {_ORDER_COLS} FROM orders WHERE order_id = %s" + (" FOR UPDATE" if lock else ""),
        (order_id,))
    row = await cur.fetchone()
    return _order(row) if row else None


async def order_by_request(conn: Conn, user_id: str, request_id: uuid.UUID) -> Order | None:
    cur = await conn.execute(
        f"SELECT {_ORDER_COLS} FROM orders WHERE user_id = %s AND request_id = %s",
        (user_id, request_id))
    row = await cur.fetchone()
    return _order(row) if row else None


async def order_by_hold(conn: Conn, hold_id: uuid.UUID, *, lock: bool = False) -> Order | None:
    cur = await conn.execute(
        f"SELECT {_ORDER_COLS} FROM orders WHERE hold_id = %s" + (" FOR UPDATE" if lock else ""),
        (hold_id,))
    row = await cur.fetchone()
    return _order(row) if row else None


async def set_order_state(
    conn: Conn, order_id: uuid.UUID, state: OrderState, payment: str = ""
) -> Order:
    cur = await conn.execute(
        f"UPDATE orders SET state = %s, payment = CASE WHEN %s = '' THEN payment ELSE %s END, "
        f"update_time = now() WHERE order_id = %s RETURNING {_ORDER_COLS}",
        (state.value, payment, payment, order_id))
    row = await cur.fetchone()
    assert row is not None
    return _order(row)


async def list_orders(
    pool: AsyncConnectionPool, user_id: str, after: tuple[datetime, uuid.UUID] | None, limit: int
) -> list[Order]:
    async with autocommit(pool) as conn:
        if after is None:
            cur = await conn.execute(
                f"SELECT {_ORDER_COLS} FROM orders WHERE user_id = %s "
                "ORDER BY create_time DESC, order_id DESC LIMIT %s", (user_id, limit))
        else:
            cur = await conn.execute(
                f"SELECT {_ORDER_COLS} FROM orders WHERE user_id = %s "
                "AND (create_time, order_id) < (%s, %s) "
                "ORDER BY create_time DESC, order_id DESC LIMIT %s",
                (user_id, after[0], after[1], limit))
        return [_order(r) for r in await cur.fetchall()]


async def insert_sold(conn: Conn, event_id: str, seat_ids: Sequence[str], order_id: uuid.UUID) -> None:
    """Raises psycopg.errors.UniqueViolation if any seat is sold already (the double-sale guard)."""
    await conn.execute(
        "INSERT INTO sold_seats (event_id, seat_id, order_id) "
        "SELECT %s, unnest(%s::text[]), %s",
        (event_id, list(seat_ids), order_id))


async def announce_sold_out(conn: Conn, event_id: str, sold_out: Outboxed) -> bool:
    """If every seat of the event is sold (a held seat may still come back: not sold out), add
    ``sold_out`` (EventSoldOut) to the outbox, in one statement (autocommit); whether it was."""
    cur = await conn.execute(
        f"""WITH s AS (SELECT 1 WHERE (SELECT count(*) FROM sold_seats WHERE event_id = %(event)s)
                                    >= (SELECT seat_count FROM events WHERE event_id = %(event)s)),
                 ob AS ({sold_out.cte("s")})
            SELECT (SELECT count(*) FROM s), {sold_out.notified("ob", conn)}""",
        {"event": event_id, **sold_out.params})
    row = await cur.fetchone()
    assert row is not None
    sold_out.sent(row[-1])
    return bool(row[0])
