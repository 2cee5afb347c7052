"""One flash sale, as fans' apps live it, through the REST edge only.

Every fan is a real account with real tokens: it signs in, joins the waiting room (some before the
sale opens, who are shuffled by the room's lottery, the rest after it, who queue first come first
served), polls `queue/me` at the pace its ETA suggests, and once admitted reads the seat map, holds
the best seats it can get (front rows first, so fans collide as they do at a real on-sale), orders
and pays. The sandbox PSP approves or declines; the fan waits on its order (WaitOrder, a long
poll) until it is CONFIRMED (or cancelled). Calls that fail for a transient reason (a restarting
service, 502/503/504, a dropped connection) are retried with the same `requestId`, as a careful
app would: the platform's idempotency makes that safe.

:func:`run` returns a :class:`SaleResult` with every fan's timings; :mod:`flashsale.report` checks
it against the server's own view (orders, payments, the seat map) and summarises it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import heapq
import json
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from meshkit.http1 import Client, HttpError

TRANSIENT = {502, 503, 504}
# How long one WaitOrder call may wait for the payment's outcome (booking allows up to 30 s).
WAIT_ORDER = "20s"
# The wait when the room admits nobody now (paused, or full and nobody leaving): long, so the
# fan looks again after the longest pause.
ETA_UNKNOWN = 60.0


class SaleError(RuntimeError):
    """The sale could not be set up (the mesh is not running, an admin call was refused...)."""


@dataclass
class SaleConfig:
    fans: int = 2000
    seats: int = 500
    seats_per_row: int = 25
    seat_limit: int = 4  # the event's per-fan limit; a fan wants 1..seat_limit seats
    early_share: float = 0.5  # fans already in the room when the sale opens (the lottery)
    lead_seconds: float = 6.0  # room open -> sale open
    arrival_seconds: float = 4.0  # the other fans arrive spread over this long after the opening
    admit_rate: float = 100.0  # the room's admitRatePerSecond
    max_active: int = 300  # the room's maxActive
    decline_share: float = 0.05  # payments the sandbox PSP declines (needs its outcome header)
    connections: int = 256  # HTTP connections to the edge, shared by all fans
    give_up_seconds: float = 10.0  # an admitted fan who sees no free seat this long leaves
    max_seconds: float = 900.0  # the whole sale, from the opening
    # How picky fans are: about this many of the best free blocks are in the running for each
    # pick (more after each lost race). Small: everyone wants the front rows, as at a real
    # on-sale; very large: picks spread over the whole map (the bench's purchase capacity).
    pick_spread: float = 4.0
    # Fans who ask the server for the best seats together (`{"quantity": n}`) instead of picking
    # on the map: they never meet a seat taken under them.
    best_share: float = 0.5
    seed: int | None = None


@dataclass
class Fan:
    index: int
    email: str
    password: str
    access: str = ""
    refresh: str = ""
    wanted: int = 1
    best: bool = False  # asks for the best available instead of picking on the map
    decline: bool = False
    arrive_at: float = 0.0  # wall clock
    join_sent: float = 0.0
    join_done: float = 0.0
    number: int = 0
    admitted_at: float = 0.0
    outcome: str = "not_started"  # bought, declined, expired, sold_out, gave_up, lost_session, error
    error: str = ""
    hold: str = ""
    order: str = ""
    payment: str = ""
    seats: list[str] = field(default_factory=list)
    steps: dict[str, float] = field(default_factory=dict)  # step -> seconds
    conflicts: int = 0  # 409s met while holding
    retries: int = 0  # transient failures retried

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.access}"}


@dataclass
class Progress:
    """Counters the fans update and the live display reads."""

    phase: str = "sign-in"  # then "sale"
    opened: float = 0.0  # the sale's opening, wall clock
    signed_in: int = 0
    joined: int = 0
    admitted: int = 0
    held: int = 0
    ordered: int = 0
    paid: int = 0
    confirmed: int = 0
    tickets: int = 0
    declined: int = 0
    done: int = 0
    conflicts: int = 0
    retries: int = 0
    errors: int = 0
    room: dict[str, Any] = field(default_factory=dict)
    seats: dict[str, int] = field(default_factory=dict)  # A / H / S counts


@dataclass
class SaleResult:
    config: SaleConfig
    edge_url: str
    event: str
    seat_count: int
    sale_open: float  # wall clock
    fans: list[Fan]
    sold_out_at: float | None  # wall clock: the seat map first showed every seat SOLD
    ended_at: float
    progress: Progress


# --- HTTP with an app's patience ---------------------------------------------------------------


@dataclass
class Reply:
    """An HTTP answer, read whole."""

    status_code: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise SaleError(f"HTTP {self.status_code}: {self.text[:300]}")


class Edge:
    """HTTP to the edge for thousands of simulated fans (meshkit.http1: keep-alive connections
    whose pool queues waiting requests in order). What it spends per request is taken from the
    platform it measures: httpx spent 4.3 ms of CPU per request with 256 connections here,
    aiohttp about 0.06-0.12 ms, http1 about a third of aiohttp's."""

    def __init__(self, base_url: str, connections: int = 256, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._connections, self._timeout = connections, timeout
        self._session: Client | None = None
        self._long: Client | None = None

    async def __aenter__(self) -> Edge:
        self._session = Client(self.base_url, limit=self._connections, timeout=self._timeout)
        # Long polls (WaitOrder) hold their connection until the answer: on connections of their
        # own, as many as there are fans waiting (each fan's phone has its own), so that they
        # never make the other requests queue for a connection.
        self._long = Client(self.base_url, limit=0, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for session in (self._session, self._long):
            if session is not None:
                await session.close()

    async def request(self, method: str, url: str, *, json: Any = None, params: dict[str, Any] | None = None,
                      headers: dict[str, str] | None = None, long_poll: bool = False) -> Reply:
        session = self._long if long_poll else self._session
        assert session is not None, "use Edge as an async context manager"
        answer = await session.request(method, url, json=json, params=params, headers=headers)
        return Reply(answer.status, answer.body.decode())


async def call(http: Edge, method: str, url: str, fan: Fan | None = None,
               progress: Progress | None = None, attempts: int = 12, **kw: Any) -> Reply:
    """One request; transient failures are retried with backoff (the caller keeps `requestId`),
    for about half a minute: long enough for a crashed service to be restarted."""
    delay = 0.2
    for attempt in range(attempts):
        try:
            resp = await http.request(method, url, **kw)
            if resp.status_code not in TRANSIENT or attempt == attempts - 1:
                return resp
        except (HttpError, TimeoutError):
            if attempt == attempts - 1:
                raise
        if fan is not None:
            fan.retries += 1
        if progress is not None:
            progress.retries += 1
        await asyncio.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, 3.0)
    raise AssertionError("unreachable")


def state_of(value: str) -> str:
    """"QUEUE_TICKET_STATE_ACTIVE" -> "ACTIVE", "ORDER_STATE_CONFIRMED" -> "CONFIRMED"."""
    return value.rsplit("_STATE_", 1)[-1]


def _metadata(resp: Reply) -> dict[str, str]:
    """The error answer's ErrorInfo metadata ({} if none)."""
    return dict(resp.json()["details"][0].get("metadata", {}))


def reason_of(resp: Reply) -> str:
    try:
        return str(resp.json()["details"][0]["reason"])
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


# --- accounts ----------------------------------------------------------------------------------


class FanPool:
    """The demo's fans, kept between runs in the stack's run folder (local test accounts only):
    email, password and the latest refresh token. A later run signs each fan in with a refresh
    (one cheap call) instead of an argon2 hash; a fan that is not in the file signs up."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.saved: dict[str, dict[str, str]] = {}
        if path is not None and path.exists():
            self.saved = json.loads(path.read_text())

    def fans(self, n: int, fresh: bool) -> list[Fan]:
        stamp = uuid.uuid4().hex[:8] if fresh else "pool"
        return [Fan(i, f"flashsale-{stamp}-{i:05d}@example.com", f"flash sale fan {i:05d}") for i in range(n)]

    def save(self, fans: list[Fan]) -> None:
        if self.path is None:
            return
        for f in fans:
            if f.refresh:
                self.saved[f.email] = {"password": f.password, "refresh": f.refresh}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.saved))
        tmp.chmod(0o600)
        tmp.replace(self.path)


async def sign_in(http: Edge, fan: Fan, pool: FanPool, progress: Progress) -> None:
    saved = pool.saved.get(fan.email)
    if saved and saved.get("refresh"):
        t = time.perf_counter()
        resp = await call(http, "POST", "/v1/sessions:refresh", fan, progress,
                          json={"refreshToken": saved["refresh"]})
        if resp.status_code == 200:
            fan.steps["refresh"] = time.perf_counter() - t
            _tokens(fan, resp)
            progress.signed_in += 1
            return
    else:  # never signed up here (or the file is gone): sign up; 409 means the account exists
        t = time.perf_counter()
        resp = await call(http, "POST", "/v1/users", fan, progress, json={
            "email": fan.email, "password": fan.password, "displayName": f"Fan {fan.index}"})
        if resp.status_code not in (200, 409):
            raise SaleError(f"sign-up of {fan.email} failed: {resp.status_code} {resp.text[:200]}")
        fan.steps["sign_up"] = time.perf_counter() - t
    t = time.perf_counter()
    resp = await call(http, "POST", "/v1/sessions", fan, progress,
                      json={"email": fan.email, "password": fan.password})
    if resp.status_code != 200:
        raise SaleError(f"log-in of {fan.email} failed: {resp.status_code} {resp.text[:200]}")
    fan.steps["log_in"] = time.perf_counter() - t
    _tokens(fan, resp)
    progress.signed_in += 1


def _tokens(fan: Fan, resp: Reply) -> None:
    body = resp.json()
    fan.access, fan.refresh = body["accessToken"], body["refreshToken"]


async def sign_in_all(http: Edge, fans: list[Fan], pool: FanPool, progress: Progress,
                      concurrency: int = 8) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(f: Fan) -> None:
        async with sem:
            await sign_in(http, f, pool, progress)

    try:
        await asyncio.gather(*(one(f) for f in fans))
    finally:
        pool.save(fans)  # refresh tokens rotate: keep the newest even when a fan failed


async def admin_token(http: Edge, email: str, password: str) -> dict[str, str]:
    resp = await call(http, "POST", "/v1/sessions", json={"email": email, "password": password})
    if resp.status_code != 200:
        raise SaleError(f"the admin {email} cannot log in: {resp.status_code} {resp.text[:200]}")
    return {"authorization": f"Bearer {resp.json()['accessToken']}"}


# --- the event -----------------------------------------------------------------------------------


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_body(cfg: SaleConfig, now: datetime, sale_open: datetime) -> dict[str, Any]:
    """`cfg.seats` seats: a VIP block in front, R behind it, a last short row of S."""
    per_row = cfg.seats_per_row
    rows, rest = divmod(cfg.seats, per_row)
    vip = max(1, rows // 5) if rows else 0
    sections = [{"name": "A", "rows": vip, "seatsPerRow": per_row, "tier": "VIP"}] if vip else []
    if rows - vip:
        sections.append({"name": "B", "rows": rows - vip, "seatsPerRow": per_row, "tier": "R"})
    if rest:
        sections.append({"name": "C", "rows": 1, "seatsPerRow": rest, "tier": "S"})
    return {
        "title": f"Flash Sale {now.strftime('%H:%M:%S')} - {cfg.seats} seats for {cfg.fans} fans",
        "artist": "The Placeholders",
        "venue": {"name": "KSPO Dome", "address": "424 Olympic-ro, Songpa-gu, Seoul"},
        "startTime": _iso(now + timedelta(days=30)),
        "queueOpenTime": _iso(now),
        "saleOpenTime": _iso(sale_open),
        "seatLimitPerFan": cfg.seat_limit,
        "priceTiers": [{"name": "VIP", "price": {"currencyCode": "KRW", "units": "165000"}},
                       {"name": "R", "price": {"currencyCode": "KRW", "units": "132000"}},
                       {"name": "S", "price": {"currencyCode": "KRW", "units": "99000"}}],
        "seatMap": {"sections": sections},
    }


async def open_sale(http: Edge, admin: dict[str, str], cfg: SaleConfig) -> tuple[str, float]:
    """Create and publish the event, tune its waiting room; return (event name, sale opening)."""
    now = datetime.now(UTC)
    sale_open = (now + timedelta(seconds=cfg.lead_seconds + 1)).replace(microsecond=0)
    created = await call(http, "POST", "/v1/events", json=event_body(cfg, now, sale_open), headers=admin)
    if created.status_code != 200:
        raise SaleError(f"creating the event failed: {created.status_code} {created.text[:300]}")
    name = str(created.json()["name"])
    published = await call(http, "POST", f"/v1/{name}:publish", json={}, headers=admin)
    if published.status_code != 200:
        raise SaleError(f"publishing the event failed: {published.status_code} {published.text[:300]}")
    deadline = time.monotonic() + 30  # the waiting room learns of the event over Kafka
    while (await call(http, "GET", f"/v1/{name}/queue")).status_code != 200:
        if time.monotonic() > deadline:
            raise SaleError("the waiting room never learned of the event (is Kafka up?)")
        await asyncio.sleep(0.2)
    tuned = await call(http, "PATCH", f"/v1/{name}/queue", headers=admin,
                       params={"updateMask": "maxActive,admitRatePerSecond"},
                       json={"maxActive": cfg.max_active, "admitRatePerSecond": cfg.admit_rate})
    if tuned.status_code != 200:
        raise SaleError(f"tuning the waiting room failed: {tuned.status_code} {tuned.text[:300]}")
    return name, sale_open.timestamp()


# --- one fan -----------------------------------------------------------------------------------


@dataclass
class SeatMap:
    sections: list[dict[str, Any]]
    _by_status: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)
    _blocks: dict[int, list[list[str]]] = field(default_factory=dict, repr=False, compare=False)

    def _ids(self, status: str) -> list[str]:
        if status not in self._by_status:
            found = []
            for s in self.sections:
                per_row = int(s["seatsPerRow"])
                for i, c in enumerate(s["statuses"]):
                    if c == status:
                        found.append(f"{s['section']}-{i // per_row + 1}-{i % per_row + 1}")
            self._by_status[status] = found
        return self._by_status[status]

    def seats(self, status: str) -> list[str]:
        """Seat ids in ``status`` ('A', 'H' or 'S'), front rows first (a fresh list)."""
        return list(self._ids(status))

    def free_blocks(self, want: int) -> list[list[str]]:
        """Every run of ``want`` adjacent free seats in one row, best first (shared: do not
        change it). Worked out once per answer and size, as hundreds of fans read each answer."""
        if want not in self._blocks:
            self._blocks[want] = blocks(self._ids("A"), want)
        return self._blocks[want]

    def counts(self) -> dict[str, int]:
        text = "".join(s["statuses"] for s in self.sections)
        return {c: text.count(c) for c in "AHS"}


# The simulator's own cost, not the platform's: hundreds of fans read the same cached seat map
# each second, and each parsed it and listed its free seats again (a tenth of the load
# generator's CPU in the purchases bench, on the machine it measures). One parse per answer.
_MAPS: dict[str, SeatMap] = {}
_MAPS_KEPT = 8


async def seat_map(http: Edge, event: str, fresh: bool = False) -> SeatMap:
    headers = {"cache-control": "no-cache"} if fresh else {}
    resp = await call(http, "GET", f"/v1/{event}/seats", params={"view": "SEAT_VIEW_COMPACT"},
                      headers=headers)
    resp.raise_for_status()
    parsed = _MAPS.get(resp.text)
    if parsed is None:
        parsed = SeatMap(resp.json()["sections"])
        if len(_MAPS) >= _MAPS_KEPT:
            _MAPS.pop(next(iter(_MAPS)))
        _MAPS[resp.text] = parsed
    return parsed


def blocks(free: list[str], want: int) -> list[list[str]]:
    """The runs of ``want`` adjacent seats in one row among ``free`` (front rows first)."""
    rows: dict[str, list[str]] = {}
    for seat in free:
        rows.setdefault(seat.rsplit("-", 1)[0], []).append(seat)
    found = []
    for row_seats in rows.values():
        nums = [int(s.rsplit("-", 1)[1]) for s in row_seats]
        for i in range(len(nums) - want + 1):
            if nums[i + want - 1] - nums[i] == want - 1:
                found.append(row_seats[i:i + want])
    return found


def pick(free: list[str], want: int, rng: random.Random, spread: float = 4.0,
         among: list[list[str]] | None = None) -> list[str]:
    """The fan's pick: `want` adjacent seats among the best blocks that are still free (about the
    `spread` best), else single seats drawn the same way. Fans prefer the front, so they collide
    there; one who lost a race looks further back next time. ``among``: the blocks of ``free``,
    when already known."""
    found = blocks(free, want) if among is None else among
    if found:
        spread = max(spread, len(found) / 8)  # many fans, many free blocks: not all on one
        if spread >= len(found):
            return list(rng.choice(found))
        return list(found[min(int(rng.expovariate(1 / spread)), len(found) - 1)])
    # No `want` adjacent seats left: `want` single seats, the i-th best weighted exp(-i/spread) as
    # a block is (drawn without replacement: the largest of log-weight plus Gumbel noise). Not
    # the `want` best for everyone: at the end of a sale every fan without a block then asked
    # for the same seats at once, a convoy of 409s (the purchases bench: 1.1-1.2 failed hold
    # attempts per purchase, 0.7-0.8 with this).
    def key(i: int) -> float:
        return -i / spread - math.log(-math.log(rng.random() or 1e-300))

    return [free[i] for i in sorted(heapq.nlargest(want, range(len(free)), key=key))]


class Sale:
    def __init__(self, http: Edge, cfg: SaleConfig, event: str, sale_open: float,
                 progress: Progress, rng: random.Random) -> None:
        self.http, self.cfg, self.event, self.sale_open = http, cfg, event, sale_open
        self.progress, self.rng = progress, rng

    async def fan(self, fan: Fan) -> None:
        try:
            await self._fan(fan)
        except Exception as exc:  # noqa: BLE001 - one fan's failure is a figure of the report
            fan.outcome, fan.error = "error", f"{type(exc).__name__}: {exc}"[:300]
            self.progress.errors += 1
        finally:
            self.progress.done += 1

    async def _timed(self, fan: Fan, step: str, coro: Awaitable[Reply]) -> Reply:
        t = time.perf_counter()
        resp = await coro
        fan.steps[step] = fan.steps.get(step, 0.0) + time.perf_counter() - t
        return resp

    def _call(self, fan: Fan, method: str, url: str, **kw: Any) -> Awaitable[Reply]:
        return call(self.http, method, url, fan, self.progress, **kw)

    async def _fan(self, fan: Fan) -> None:
        await asyncio.sleep(max(0.0, fan.arrive_at - time.time()))
        fan.join_sent = time.time()
        joined = await self._timed(fan, "join", self._call(fan, "POST", f"/v1/{self.event}/queue:join",
                                                            json={}, headers=fan.auth))
        fan.join_done = time.time()
        if joined.status_code != 200:
            raise SaleError(f"join: {joined.status_code} {joined.text[:200]}")
        fan.number = int(joined.json()["number"])
        self.progress.joined += 1
        if state_of(joined.json()["state"]) == "SOLD_OUT":  # too late: the room takes nobody in
            fan.outcome = "sold_out"
            return

        token = await self._wait(fan)
        if token is None:
            return
        admitted = {**fan.auth, "x-admission-token": token}
        t = time.perf_counter()
        hold = await self._hold(fan, admitted)
        if hold is None:
            await self._call(fan, "POST", f"/v1/{self.event}/queue:leave", json={}, headers=fan.auth)
            return
        self.progress.held += 1

        order = await self._timed(fan, "order", self._call(
            fan, "POST", "/v1/orders", json={"hold": hold, "requestId": str(uuid.uuid4())},
            headers=admitted))
        if order.status_code != 200:
            raise SaleError(f"order: {order.status_code} {order.text[:200]}")
        fan.order = order.json()["name"]
        self.progress.ordered += 1

        pay_headers = {**fan.auth, **({"x-sandbox-outcome": "decline"} if fan.decline else {})}
        paid = await self._timed(fan, "pay", self._call(
            fan, "POST", "/v1/payments", json={"order": fan.order, "requestId": str(uuid.uuid4())},
            headers=pay_headers))
        if paid.status_code != 200:
            raise SaleError(f"payment: {paid.status_code} {paid.text[:200]}")
        fan.payment = paid.json()["name"]
        self.progress.paid += 1

        t_pay = time.perf_counter()
        final = await self._settled(fan)
        fan.steps["confirm"] = time.perf_counter() - t_pay
        if final == "CONFIRMED":
            fan.outcome = "bought"
            fan.steps["purchase"] = time.perf_counter() - t
            self.progress.confirmed += 1
            self.progress.tickets += len(fan.seats)
        elif final == "CANCELLED":
            fan.outcome = "declined"
            self.progress.declined += 1
        else:
            fan.outcome = final.lower()

    async def _wait(self, fan: Fan) -> str | None:
        """Wait for the fan's turn; the admission token, or None.

        As a good app does: the fan's own ticket (`queue/me`, a call into the waiting room) is
        read when the number is not known yet (joined before the lottery) and when the turn has
        come (that read claims the slot). In between, the position is the number minus the
        public status's serving number, which the edge's cache answers, polled at the pace the
        room admits at (as it measures it: a full room admits only as fans leave).
        """
        while True:
            if fan.number and time.time() > self.sale_open:
                status = await self._call(fan, "GET", f"/v1/{self.event}/queue")
                if status.status_code == 200:
                    room = status.json()
                    if room.get("soldOut"):
                        fan.outcome = "sold_out"
                        return None
                    ahead = fan.number - int(room.get("servingNumber", 0))
                    if ahead > 0:
                        # The wait at the rate fans are let in now (less than the configured
                        # one while the room is full), else at the configured rate.
                        measured = room.get("measuredAdmitRatePerSecond")
                        rate = float(room.get("admitRatePerSecond", 0) or 0) if measured is None \
                            else float(measured)
                        await self._pause(ahead / rate if rate > 1e-6 else ETA_UNKNOWN)
                        continue
            elif not fan.number and time.time() < self.sale_open:  # the draw is at the opening
                await asyncio.sleep(self.sale_open - time.time() + self.rng.uniform(0.0, 1.0))
                continue
            resp = await self._call(fan, "GET", f"/v1/{self.event}/queue/me", headers=fan.auth)
            if resp.status_code != 200:
                raise SaleError(f"queue/me: {resp.status_code} {resp.text[:200]}")
            ticket = resp.json()
            state = state_of(ticket["state"])
            fan.number = int(ticket.get("number", 0) or 0) or fan.number  # drawn at the opening
            if state == "ACTIVE":
                fan.admitted_at = time.time()
                fan.steps["wait"] = fan.admitted_at - fan.join_done
                self.progress.admitted += 1
                return str(ticket["admissionToken"])
            if state in ("SOLD_OUT", "EXPIRED", "LEFT"):
                fan.outcome = {"SOLD_OUT": "sold_out"}.get(state, "lost_session")
                return None
            if state == "NOT_JOINED":  # the room lost the ticket: waiting on would never end
                raise SaleError(f"queue/me: NOT_JOINED after joining as number {fan.number}")
            await self._pause(float(ticket.get("etaSeconds", 0) or 0))

    async def _pause(self, eta: float) -> None:
        """Until the next look: a third of the ETA, between half a second and five."""
        await asyncio.sleep(min(5.0, max(0.5, eta / 3)) * self.rng.uniform(0.8, 1.2))

    def _none_free(self, fan: Fan, seats: SeatMap, since: float | None) -> float | None:
        """Nothing free for this fan: held seats come back when a payment is declined or a hold
        expires, so the fan waits for them; but not once none is held (sold out), nor longer
        than give_up_seconds. When the fan first saw nothing free; None once the fan leaves
        (fan.outcome says why)."""
        if seats.counts()["H"] == 0:
            fan.outcome = "sold_out"
            return None
        now = time.monotonic()
        since = since or now
        if now - since > self.cfg.give_up_seconds:
            fan.outcome = "gave_up"
            return None
        return since

    @staticmethod
    def _refused(fan: Fan, resp: Reply, reason: str) -> None:
        """A hold refused for a reason the fan cannot act on: its session ended (fan.outcome
        says so), or the sale is broken (SaleError)."""
        if resp.status_code == 403 and reason == "NOT_ADMITTED":
            fan.outcome = "lost_session"
            return
        raise SaleError(f"hold: {resp.status_code} {resp.text[:200]}")

    async def _try_hold(self, fan: Fan, admitted: dict[str, str], body: dict[str, Any],
                        t: float) -> tuple[str | None, Reply, str]:
        """POST the hold (a new request id); the hold's name if it was made (timed from ``t``),
        the answer and its reason."""
        resp = await self._call(fan, "POST", f"/v1/{self.event}/holds", headers=admitted,
                                json={**body, "requestId": str(uuid.uuid4())})
        if resp.status_code != 200:
            return None, resp, reason_of(resp)
        fan.hold, fan.seats = resp.json()["name"], list(resp.json()["seatIds"])
        fan.steps["hold"] = time.perf_counter() - t
        fan.steps["hold_best" if fan.best else "hold_on_map"] = fan.steps["hold"]
        return fan.hold, resp, ""

    async def _hold(self, fan: Fan, admitted: dict[str, str]) -> str | None:
        """Hold the best seats left; a 409 names the taken ones and the fan picks again."""
        if fan.best:
            return await self._hold_best(fan, admitted)
        taken: set[str] = set()
        no_free_since: float | None = None
        fresh = False
        t = time.perf_counter()
        while True:
            seats = await seat_map(self.http, self.event, fresh)
            free = [s for s in seats.seats("A") if s not in taken] if taken else seats.seats("A")
            if not free:
                no_free_since = self._none_free(fan, seats, no_free_since)
                if no_free_since is None:
                    return None
                taken.clear()
                fresh = False
                await asyncio.sleep(1.0)
                continue
            no_free_since = None
            want = min(fan.wanted, len(free))
            # The map's own blocks (worked out once per answer), less any a 409 named.
            among = seats.free_blocks(want)
            if taken:
                among = [b for b in among if taken.isdisjoint(b)]
            choice = pick(free, want, self.rng, spread=self.cfg.pick_spread * (1 + fan.conflicts),
                          among=among)
            held, resp, reason = await self._try_hold(fan, admitted, {"seatIds": choice}, t)
            if held:
                return held
            if resp.status_code == 409 and reason == "SEAT_UNAVAILABLE":
                fan.conflicts += 1
                self.progress.conflicts += 1
                taken.update(s for s in _metadata(resp).get("seat_ids", "").split(",") if s)
                fresh = fan.conflicts % 3 == 0  # past the edge's one-second copy now and then
                continue
            self._refused(fan, resp, reason)
            return None

    async def _hold_best(self, fan: Fan, admitted: dict[str, str]) -> str | None:
        """Ask for the best `wanted` seats side by side; with fewer together than that, take as
        many as there are (the server says how many); with none free, wait for held seats to
        come back as the map's pickers do."""
        want = fan.wanted
        no_free_since: float | None = None
        t = time.perf_counter()
        while True:
            held, resp, reason = await self._try_hold(fan, admitted, {"quantity": want}, t)
            if held:
                return held
            if resp.status_code == 409 and reason == "NO_SEATS_TOGETHER":
                want = max(1, min(want - 1, int(_metadata(resp).get("longest_run", "1"))))
                continue
            if resp.status_code == 409 and reason == "SOLD_OUT":
                no_free_since = self._none_free(fan, await seat_map(self.http, self.event), no_free_since)
                if no_free_since is None:
                    return None
                await asyncio.sleep(1.0)
                continue
            self._refused(fan, resp, reason)
            return None

    async def _settled(self, fan: Fan) -> str:
        """Wait for the payment's outcome to reach the order: WaitOrder answers the moment it
        does (or after its timeout, still PENDING_PAYMENT, and the fan asks again)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            resp = await self._call(fan, "GET", f"/v1/{fan.order}:wait", params={"timeout": WAIT_ORDER},
                                    headers=fan.auth, long_poll=True)
            if resp.status_code != 200:  # still failing after call()'s retries: a while longer
                await asyncio.sleep(1.0)
                continue
            state = state_of(resp.json()["state"])
            if state != "PENDING_PAYMENT":
                return state
        return "PENDING_PAYMENT"


async def watch(edge_url: str, event: str, seat_count: int, progress: Progress, stop: asyncio.Event,
                every: float = 0.5) -> float | None:
    """Read the room's status and the seat map (past the cache) on a connection of its own until
    stopped; return when the seat map first showed every seat SOLD."""
    sold_out_at = None
    async with Edge(edge_url, connections=2, timeout=10) as http:
        while not stop.is_set():
            try:
                status = await http.request("GET", f"/v1/{event}/queue")
                if status.status_code == 200:
                    progress.room = status.json()
                seats = await seat_map(http, event, fresh=True)
                progress.seats = seats.counts()
                if sold_out_at is None and progress.seats["S"] == seat_count:
                    sold_out_at = time.time()
            except (HttpError, TimeoutError, SaleError):
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
    return sold_out_at


def plan_fans(fans: list[Fan], cfg: SaleConfig, room_ready: float, sale_open: float,
              rng: random.Random) -> None:
    """Who wants how many seats, who pays with a card that is declined, who arrives when."""
    early = int(round(len(fans) * cfg.early_share))
    for i, f in enumerate(rng.sample(fans, len(fans))):
        f.wanted = min(cfg.seat_limit, rng.choices([1, 2, 3, 4], weights=[20, 50, 15, 15])[0])
        f.decline = rng.random() < cfg.decline_share
        if cfg.best_share > 0:  # (no draw when none do: a seeded sale plans its fans as before)
            f.best = rng.random() < cfg.best_share
        if i < early:  # in the room before the opening, with half a second to spare
            f.arrive_at = rng.uniform(room_ready, max(room_ready, sale_open - 0.5))
        else:
            f.arrive_at = sale_open + 0.2 + rng.uniform(0, cfg.arrival_seconds)


async def run(edge_url: str, admin: tuple[str, str], cfg: SaleConfig, *, pool: FanPool | None = None,
              fresh_fans: bool = False, on_tick: Callable[[Progress], None] | None = None,
              on_phase: Callable[[str], None] | None = None) -> SaleResult:
    """Sign the fans in, open a sale, let them buy; every fan's story and the sale's timeline."""
    rng = random.Random(cfg.seed)
    pool = pool or FanPool(None)
    progress = Progress()
    say = on_phase or (lambda _: None)
    stop = asyncio.Event()
    ticker = None
    if on_tick is not None:
        ticker = asyncio.create_task(_every(0.5, stop, functools.partial(on_tick, progress)))
    try:
        async with Edge(edge_url, cfg.connections) as http:
            admin_auth = await admin_token(http, *admin)
            fans = pool.fans(cfg.fans, fresh_fans)
            say(f"signing in {len(fans)} fans")
            await sign_in_all(http, fans, pool, progress)
            say(f"opening a sale of {cfg.seats} seats")
            event, opened = await open_sale(http, admin_auth, cfg)
            progress.phase, progress.opened = "sale", opened
            plan_fans(fans, cfg, time.time(), opened, rng)
            watcher = asyncio.create_task(watch(edge_url, event, cfg.seats, progress, stop))
            sale = Sale(http, cfg, event, opened, progress, rng)
            tasks = [asyncio.create_task(sale.fan(f)) for f in fans]
            _, pending = await asyncio.wait(tasks, timeout=max(1.0, opened + cfg.max_seconds - time.time()))
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for f in fans:
                if f.outcome == "not_started" or (f.outcome == "error" and not f.error):
                    f.outcome, f.error = "timed_out", "the sale's time limit ended before this fan did"
            ended = time.time()
            stop.set()
            sold_out_at = await watcher
    finally:
        stop.set()
        if ticker is not None:
            await ticker
    return SaleResult(cfg, edge_url, event, cfg.seats, opened, fans, sold_out_at, ended, progress)


async def _every(seconds: float, stop: asyncio.Event, do: Callable[[], None]) -> None:
    while not stop.is_set():
        do()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
    do()


def order_violations(fans: list[Fan]) -> tuple[int, int]:
    """Among fans whose joins did not overlap in time (one answered before the other was sent),
    how many pairs got numbers out of join order; and how many such ordered pairs were checked
    (counting, for each fan, whether any earlier-finished join holds a higher number)."""
    by_done = sorted(fans, key=lambda f: f.join_done)
    done_times = [f.join_done for f in by_done]
    prefix_max, best = [], 0
    for f in by_done:
        best = max(best, f.number)
        prefix_max.append(best)
    violations = checked = 0
    for f in fans:
        k = bisect.bisect_left(done_times, f.join_sent)
        if k:
            checked += 1
            violations += prefix_max[k - 1] > f.number
    return violations, checked


def in_order_share(fans: list[Fan], rng: random.Random, samples: int = 20000) -> float:
    """Share of random pairs whose numbers follow their join order (1.0 FIFO, ~0.5 shuffled)."""
    if len(fans) < 2:
        return float("nan")
    hits = 0
    for _ in range(samples):
        a, b = rng.sample(fans, 2)
        if a.join_done > b.join_done:
            a, b = b, a
        hits += a.number < b.number
    return hits / samples
