"""Booking under a crowd, through the edge: real fans, a real waiting room, real admission tokens.

1,000 signed-up fans are admitted by the waiting room and all POST their holds at once for 100
seats with overlapping picks; some winners order and pay. Nothing may be held by two fans, held
in part, or sold twice, and held + sold never exceeds the inventory: in the answers, in the seat
map and in PostgreSQL.

Then Redis is flushed in the middle of a sale: booking rebuilds from PostgreSQL, the waiting room
comes back from catalog without the tickets and sessions it lost, so the booking routes stay shut
to the fans it held (never a pass), and once admissions are back no seat sold or held before is
given again.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import httpx
import psycopg
import pytest
import redis

from devstack.layout import Layout
from svc_booking.config import Settings as BookingSettings

from ..support import overlapping_picks
from .conftest import Fan, crowd_client, sign_up_async
from .test_sale_edge import _admitted_async, _hold, _sale, _until

pytestmark = pytest.mark.e2e

FANS, ROWS, PER_ROW = 1000, 10, 10
SEATS = ROWS * PER_ROW
# Holds in flight at once through the edge: a real race at booking (its Redis script runs them
# one at a time anyway), and a client that does not spend the test's time on its own pool.
CONNECTIONS = 32


def booking_db(lay: Layout) -> str:
    return lay.postgres_dsn(lay.service("booking").database)


def seat_map(http: httpx.Client, event: str) -> dict[str, str]:
    """seat id -> AVAILABLE / HELD / SOLD, past the edge's one-second cache."""
    resp = http.get(f"/v1/{event}/seats", headers={"cache-control": "no-cache"})
    assert resp.status_code == 200, resp.text
    return {s["seatId"]: s["status"].removeprefix("SEAT_STATUS_") for s in resp.json()["seats"]}


def seat_map_once_sold(http: httpx.Client, event: str, sold: set[str]) -> dict[str, str]:
    """The seat map once it shows these seats SOLD: an order reads CONFIRMED as soon as
    PostgreSQL committed the sale, and booking marks the seats in Redis right after."""
    def shows_sold() -> dict[str, str] | None:
        seats = seat_map(http, event)
        return seats if sold <= {s for s, st in seats.items() if st == "SOLD"} else None
    return _until(shows_sold, within=5.0, every=0.1)


def live_and_sold(lay: Layout, event: str) -> tuple[Counter[str], Counter[str]]:
    """PostgreSQL's view: how many live holds (ACTIVE, ORDERED) name each seat, and how many
    sold_seats rows each seat has."""
    event_id = event.removeprefix("events/")
    with psycopg.connect(booking_db(lay)) as conn:
        held = conn.execute("SELECT seat_ids FROM holds WHERE event_id = %s "
                            "AND state IN ('ACTIVE', 'ORDERED')", (event_id,)).fetchall()
        sold = conn.execute("SELECT seat_id FROM sold_seats WHERE event_id = %s",
                            (event_id,)).fetchall()
    return Counter(s for (ids,) in held for s in ids), Counter(s for (s,) in sold)


async def crowd(client: httpx.AsyncClient, event: str, n: int) -> list[tuple[Fan, str]]:
    """n fans signed up, joined and admitted by the waiting room: (fan, admission token). Each
    fan goes on as soon as they can, as apps do: the first join while others still sign up."""

    async def one() -> tuple[Fan, str]:
        fan = await sign_up_async(client)
        joined = await client.post(f"/v1/{event}/queue:join", json={}, headers=fan.auth)
        assert joined.status_code == 200, joined.text
        return fan, (await _admitted_async(client, fan, event, within=60))["admissionToken"]

    return list(await asyncio.gather(*(one() for _ in range(n))))


def judge(answers: list[httpx.Response], picks: list[list[str]], *, limited: frozenset[int] = frozenset()
          ) -> tuple[list[tuple[int, dict]], dict[str, int]]:
    """Every answer to a race of holds is all of the fan's pick (200) or none of it: 409
    SEAT_UNAVAILABLE naming seats of the pick, or, for the fans in `limited` (who hold or bought
    seats already), 429 SEAT_LIMIT_EXCEEDED; no seat is won twice. (winners' holds, seat -> fan)."""
    won: list[tuple[int, dict]] = []
    for i, resp in enumerate(answers):
        if resp.status_code == 200:
            won.append((i, resp.json()))
            continue
        (info,) = resp.json()["details"]
        if resp.status_code == 429 and i in limited:
            assert info["reason"] == "SEAT_LIMIT_EXCEEDED", info
            continue
        assert resp.status_code == 409, (i, resp.status_code, resp.text)
        assert info["reason"] == "SEAT_UNAVAILABLE", info
        # the seats named are some of this fan's pick: taken by someone else
        assert set(info["metadata"]["seat_ids"].split(",")) <= set(picks[i]), (info, picks[i])
    owner: dict[str, int] = {}
    for i, hold in won:
        assert hold["seatIds"] == picks[i], (hold, picks[i])  # all of the pick, never a part
        for seat in hold["seatIds"]:
            assert seat not in owner, f"{seat} held by fans {owner[seat]} and {i}"
            owner[seat] = i
    return won, owner


async def order(client: httpx.AsyncClient, fan: Fan, token: str, hold: str) -> str:
    """Order from the hold (sent twice at once, as a nervous app would: one order); its name."""
    admitted = {**fan.auth, "x-admission-token": token}
    first, again = await asyncio.gather(*(
        client.post("/v1/orders", json={"hold": hold, "requestId": str(uuid.uuid4())},
                    headers=admitted) for _ in range(2)))
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert first.json()["name"] == again.json()["name"]  # one hold, one order
    assert first.json()["state"].endswith("PENDING_PAYMENT")
    return str(first.json()["name"])


async def pay(client: httpx.AsyncClient, fan: Fan, order_name: str) -> dict:
    """Pay (needs no admission); wait for CONFIRMED: the sandbox provider calls the signed
    webhook back through the edge and booking consumes PaymentSucceeded."""
    paid = await client.post("/v1/payments", json={"order": order_name,
                                                    "requestId": str(uuid.uuid4())},
                             headers=fan.auth)
    assert paid.status_code == 200, paid.text
    deadline = time.monotonic() + 30
    while True:
        got = (await client.get(f"/v1/{order_name}", headers=fan.auth)).json()
        if got["state"].endswith("CONFIRMED"):
            return got
        assert not got["state"].endswith(("CANCELLED", "EXPIRED")), got
        assert time.monotonic() < deadline, f"{order_name} never confirmed: {got}"
        await asyncio.sleep(0.2)


async def order_and_pay(client: httpx.AsyncClient, fan: Fan, token: str, hold: str) -> dict:
    return await pay(client, fan, await order(client, fan, token, hold))


async def test_1000_admitted_fans_race_for_100_seats(http: httpx.Client, admin: Fan, mesh: Layout):
    t0 = time.monotonic()
    # Let the whole crowd in at once: 1,000 active sessions, admitted within a second or two.
    event = _sale(http, admin, opens_in=1, rows=ROWS, seats_per_row=PER_ROW, seatLimitPerFan=4,
                  room={"maxActive": FANS, "admitRatePerSecond": 5000})
    picks = overlapping_picks(FANS, ROWS, PER_ROW, seed=6)
    async with crowd_client(mesh.edge_url, CONNECTIONS) as client:
        fans = await crowd(client, event, FANS)
        t_admitted = time.monotonic()

        answers = await asyncio.gather(*(_hold(client, f, event, token, picks[i])
                                         for i, (f, token) in enumerate(fans)))
        t_raced = time.monotonic()
        won, owner = judge(answers, picks)
        assert won, "somebody must win"
        assert len(owner) <= SEATS
        # In the seat map and in PostgreSQL: exactly the winners' seats are held, once each.
        seats = seat_map(http, event)
        assert {s for s, st in seats.items() if st == "HELD"} == set(owner)
        assert set(seats.values()) <= {"AVAILABLE", "HELD"}
        held, sold = live_and_sold(mesh, event)
        assert set(held) == set(owner) and max(held.values()) == 1 and not sold

        # Some winners order and pay, all at once.
        buyers = won[:12]
        orders = await asyncio.gather(*(order_and_pay(client, fans[i][0], fans[i][1], hold["name"])
                                        for i, hold in buyers))
        t_sold = time.monotonic()

    bought = {s for o in orders for s in o["seatIds"]}
    assert bought == {s for _, hold in buyers for s in hold["seatIds"]}
    seats = seat_map_once_sold(http, event, bought)
    assert {s for s, st in seats.items() if st == "SOLD"} == bought
    assert {s for s, st in seats.items() if st == "HELD"} == set(owner) - bought
    held, sold = live_and_sold(mesh, event)
    assert set(sold) == bought and max(sold.values()) == 1  # no seat sold twice
    assert set(held) == set(owner) - bought and max(held.values(), default=1) == 1
    assert sum(held.values()) + sum(sold.values()) <= SEATS  # held + sold within the inventory
    print(f"\n{FANS} fans admitted in {t_admitted - t0:.1f}s; race {t_raced - t_admitted:.1f}s: "
          f"{len(won)} holds won, {len(owner)} seats held, "
          f"{len(answers) - len(won)} answered 409; {len(orders)} orders paid in "
          f"{t_sold - t_raced:.1f}s")


# --- Redis flushed in the middle of a sale -----------------------------------------------------

# A FLUSHALL as this sale sees it: every key under one of its hash tags is gone. The test stack's
# Redis is shared by every suite running against it (other sales' rooms and inventories, the
# waiting room's admission-token keys, identity's throttles), so only this sale's keys are
# dropped, in one script (nothing of the sale can be written in between). Dropping them is what
# the sale would see of a real FLUSHALL; DUMPing and RESTOREing everything else around one did the
# same, but took seconds on a stack that has collected a few hundred thousand keys, and blocked
# the other services meanwhile. This sale's waiting-room keys (ARGV[2]) are returned as name,
# PTTL, DUMP triples, for the test to bring back later; its inventory ({inv:<event>}) is gone
# for good. (Event ids are UUIDs: no glob characters in the patterns.)
FLUSH_THIS_SALE = """
local out = {}
for _, k in ipairs(redis.call('KEYS', ARGV[2] .. '*')) do
  out[#out + 1] = k; out[#out + 1] = math.max(redis.call('PTTL', k), 0)
  out[#out + 1] = redis.call('DUMP', k)
  redis.call('DEL', k)
end
for _, k in ipairs(redis.call('KEYS', ARGV[1] .. '*')) do redis.call('DEL', k) end
return out
"""


def flush_mid_sale(lay: Layout, event: str) -> list[tuple[bytes, int, bytes]]:
    """FLUSHALL on the test stack's Redis, as this sale sees it (see FLUSH_THIS_SALE);
    returns the waiting room's keys as they were."""
    event_id = event.removeprefix("events/")
    r = redis.Redis.from_url(lay.redis_url)
    try:
        flat = r.eval(FLUSH_THIS_SALE, 0, "{inv:" + event_id + "}", "{q:" + event_id + "}")
        assert not r.keys("{inv:" + event_id + "}*") and not r.keys("{q:" + event_id + "}*")
    finally:
        r.close()
    return [(flat[i], int(flat[i + 1]), flat[i + 2]) for i in range(0, len(flat), 3)]


def restore_room(lay: Layout, keys: list[tuple[bytes, int, bytes]]) -> None:
    r = redis.Redis.from_url(lay.redis_url)
    try:
        for name, ttl, value in keys:
            r.restore(name, ttl, value, replace=True)
    finally:
        r.close()


def statuses(seats: dict[str, str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"AVAILABLE": set(), "HELD": set(), "SOLD": set()}
    for seat, status in seats.items():
        out[status].add(seat)
    return out


async def test_redis_flushed_mid_sale_never_sells_a_seat_twice(http: httpx.Client, admin: Fan,
                                                                mesh: Layout):
    event = _sale(http, admin, opens_in=1, rows=2, seats_per_row=10, seatLimitPerFan=4,
                  room={"maxActive": 100, "admitRatePerSecond": 200})
    async with crowd_client(mesh.edge_url, CONNECTIONS) as client:
        fans = await crowd(client, event, 24)
        (buyer, buyer_token), (payer, payer_token), (holder, holder_token), (late, late_token) = \
            fans[:4]

        async def hold(i: int, seats: list[str]) -> dict:
            resp = await _hold(client, fans[i][0], event, fans[i][1], seats)
            assert resp.status_code == 200, resp.text
            return resp.json()

        # Before the flush: two seats sold, two ordered (not paid yet), one held.
        await order_and_pay(client, buyer, buyer_token, (await hold(0, ["A-1-1", "A-1-2"]))["name"])
        unpaid = await order(client, payer, payer_token, (await hold(1, ["A-1-3", "A-1-4"]))["name"])
        held = await hold(2, ["A-1-5"])
        before = statuses(seat_map_once_sold(http, event, {"A-1-1", "A-1-2"}))
        assert (before["SOLD"], before["HELD"]) == ({"A-1-1", "A-1-2"}, {"A-1-3", "A-1-4", "A-1-5"})

        room = flush_mid_sale(mesh, event)
        assert room, "the waiting room had state to lose"

        # Booking rebuilds the seat state from PostgreSQL: sold seats stay SOLD, held stay HELD.
        assert statuses(seat_map(http, event)) == before
        # The waiting room comes back from catalog at once (svc_queue/README.md "What survives
        # what"), but the tickets and sessions in it were lost with the flush: the fan must join
        # again, and nobody's admission can be confirmed, so booking lets nobody in (never a
        # pass; svc_booking/README.md "Admission").
        gone = await client.get(f"/v1/{event}/queue/me", headers=late.auth)
        assert gone.status_code == 200, gone.text
        assert gone.json()["state"].endswith("NOT_JOINED")
        # Past the time booking takes a positive answer's or a fresh token's word for an
        # admission (the test stack runs its default): then nobody passes.
        await asyncio.sleep(BookingSettings.model_fields["admission_cache_seconds"].default + 1.1)
        refused = await _hold(client, late, event, late_token, ["A-2-1"])
        assert refused.status_code == 403 and refused.json()["details"][0]["reason"] == "NOT_ADMITTED"
        no_order = await client.post("/v1/orders", json={"hold": held["name"],
                                                         "requestId": str(uuid.uuid4())},
                                     headers={**holder.auth, "x-admission-token": holder_token})
        assert no_order.status_code == 403, no_order.text
        # Paying needs no admission: the unpaid order is paid, its seats sold once.
        await pay(client, payer, unpaid)
        after = statuses(seat_map_once_sold(http, event, {"A-1-1", "A-1-2", "A-1-3", "A-1-4"}))
        assert (after["SOLD"], after["HELD"]) == ({"A-1-1", "A-1-2", "A-1-3", "A-1-4"}, {"A-1-5"})

        # The waiting room comes back as it was (booking's state is the rebuilt one) and the
        # sale goes on: the fans still admitted (not the buyers: a purchase ends the session)
        # race for overlapping seats, sold and held ones included.
        restore_room(mesh, room)
        racers = fans[2:]  # the holder first: one seat held already, so the limit may answer
        picks = overlapping_picks(len(racers), 2, 10, seed=7)
        answers = await asyncio.gather(*(_hold(client, f, event, token, picks[i])
                                         for i, (f, token) in enumerate(racers)))
        won, owner = judge(answers, picks, limited=frozenset({0}))
        assert won, "somebody must win"
        assert not set(owner) & (after["SOLD"] | after["HELD"])  # nothing sold or held is won
        bought = [await order_and_pay(client, racers[i][0], racers[i][1], h["name"])
                  for i, h in won[:3]]

    sold_now = after["SOLD"] | {s for o in bought for s in o["seatIds"]}
    final = statuses(seat_map_once_sold(http, event, sold_now))
    assert final["SOLD"] == sold_now
    assert final["HELD"] == {"A-1-5"} | (set(owner) - sold_now)
    live, sold = live_and_sold(mesh, event)
    assert set(sold) == sold_now and max(sold.values()) == 1  # no seat sold twice
    assert set(live) == final["HELD"] and max(live.values()) == 1
    assert sum(live.values()) + sum(sold.values()) <= 20
    with psycopg.connect(booking_db(mesh)) as conn:
        confirmed = conn.execute("SELECT count(*) FROM orders WHERE event_id = %s AND state = "
                                 "'CONFIRMED'", (event.removeprefix("events/"),)).fetchone()
    assert confirmed == (2 + len(bought),)
