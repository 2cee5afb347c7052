"""A sale through the edge: the waiting room admits fans, and only admitted fans reach booking."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest

from devstack.layout import Layout
from svc_booking.config import Settings as BookingSettings

from .conftest import Fan, sign_up
from .test_catalog_edge import _iso, create_and_publish, event_json

pytestmark = pytest.mark.e2e


def _sale(http: httpx.Client, admin: Fan, opens_in: float = 4.0, *, rows: int = 2,
          seats_per_row: int = 10, room: dict | None = None, **event: object) -> str:
    """A published event (section A of rows x seats_per_row VIP seats at KRW 1000) whose waiting
    room is open; `room` (maxActive, admitRatePerSecond, ...) is PATCHed by the admin before
    anyone joins; `event` overrides fields of the event's JSON."""
    now = datetime.now(UTC)
    # _iso keeps whole seconds: the opening is rounded UP, or a lead of one second would be one
    # second less the fraction of `now` (CI saw 10 ms, and a publish refused as too late).
    opening = now + timedelta(seconds=opens_in)
    opening += timedelta(microseconds=(1_000_000 - opening.microsecond) % 1_000_000)
    body = event_json(queueOpenTime=_iso(now), saleOpenTime=_iso(opening),
                      seatMap={"sections": [{"name": "A", "rows": rows, "seatsPerRow": seats_per_row,
                                             "tier": "VIP"}]},
                      priceTiers=[{"name": "VIP", "price": {"currencyCode": "KRW", "units": "1000"}}],
                      **event)
    name = create_and_publish(http, admin, body)["name"]
    deadline = time.monotonic() + 15  # the queue learns of the event from Kafka
    while http.get(f"/v1/{name}/queue").status_code != 200:
        assert time.monotonic() < deadline, "the waiting room never learned of the event"
        time.sleep(0.2)
    if room:
        changed = http.patch(f"/v1/{name}/queue", params={"updateMask": ",".join(room)}, json=room,
                             headers=admin.auth)
        assert changed.status_code == 200, changed.text
    return name


def _active(me: httpx.Response) -> dict | None:
    """The fan's ticket if queue/me answered ACTIVE (with the admission token), else None."""
    assert me.status_code == 200, me.text
    ticket = me.json()
    return ticket if ticket["state"].endswith("ACTIVE") else None


def _admitted(http: httpx.Client, fan: Fan, event: str, within: float = 30.0) -> dict:
    deadline = time.monotonic() + within
    while (ticket := _active(http.get(f"/v1/{event}/queue/me", headers=fan.auth))) is None:
        assert time.monotonic() < deadline, f"{fan.id} never admitted to {event}"
        time.sleep(0.3)
    return ticket


async def _admitted_async(client: httpx.AsyncClient, fan: Fan, event: str,
                          within: float = 30.0) -> dict:
    """_admitted for many fans at once: queue/me until ACTIVE (that read claims the turn)."""
    deadline = time.monotonic() + within
    while (ticket := _active(await client.get(f"/v1/{event}/queue/me", headers=fan.auth))) is None:
        assert time.monotonic() < deadline, f"{fan.id} never admitted to {event}"
        await asyncio.sleep(0.3)
    return ticket


def _hold(http: httpx.Client | httpx.AsyncClient, fan: Fan, event: str, token: str,
          seats: list[str]) -> Any:
    """POST the hold; with an AsyncClient, the awaitable of its response."""
    return http.post(f"/v1/{event}/holds", json={"seatIds": seats, "requestId": str(uuid.uuid4())},
                     headers={**fan.auth, "x-admission-token": token})


@pytest.fixture(scope="module")
def sale(http: httpx.Client, admin: Fan) -> tuple[str, list[Fan]]:
    event = _sale(http, admin)
    fans = [sign_up(http) for _ in range(3)]
    for f in fans:
        joined = http.post(f"/v1/{event}/queue:join", json={}, headers=f.auth)
        assert joined.status_code == 200, joined.text
    return event, fans


def test_join_before_the_room_opens_is_412_with_a_reason(http: httpx.Client, admin: Fan):
    """FAILED_PRECONDITION is HTTP 412 at the edge (the transcoder alone would say 400, as for a
    malformed request); the reason and the opening time come with it."""
    now = datetime.now(UTC)
    body = event_json(queueOpenTime=_iso(now + timedelta(hours=1)),
                      saleOpenTime=_iso(now + timedelta(hours=2)))
    name = create_and_publish(http, admin, body)["name"]
    fan = sign_up(http)
    deadline = time.monotonic() + 15  # the queue learns of the event from Kafka
    while (joined := http.post(f"/v1/{name}/queue:join", json={}, headers=fan.auth)).status_code == 404:
        assert time.monotonic() < deadline, "the waiting room never learned of the event"
        time.sleep(0.2)
    assert joined.status_code == 412, joined.text
    info = joined.json()["details"][0]
    assert info["reason"] == "QUEUE_NOT_OPEN" and info["metadata"]["queue_open_time"].endswith("Z")
    malformed = http.post(f"/v1/{name}/queue:join", content=b"{",
                          headers={**fan.auth, "content-type": "application/json"})
    assert malformed.status_code == 400, malformed.text


def test_join_is_idempotent_and_status_is_public(http: httpx.Client, sale):
    event, fans = sale

    def join() -> dict:
        return http.post(f"/v1/{event}/queue:join", json={}, headers=fans[0].auth).json()

    first, again = join(), join()
    if first.get("number", "0") == "0" and again.get("number", "0") != "0":
        # The draw at the opening came in between (on a slow start, it can): it gave the fan who
        # joined before it a number, and from then on joining again keeps that number.
        first, again = again, join()
    # The same ticket and place (its state may move on in between: the room admits meanwhile).
    assert (again["event"], again.get("number")) == (first["event"], first.get("number"))
    status = http.get(f"/v1/{event}/queue")
    assert status.status_code == 200 and "max-age" in status.headers["cache-control"]
    assert {"servingNumber", "waitingCount", "activeCount", "admitRatePerSecond", "maxActive",
            "paused"} <= set(status.json())
    assert http.post(f"/v1/{event}/queue:join", json={}).status_code == 401


def test_admitted_fans_hold_seats_and_nobody_else_does(http: httpx.Client, sale):
    event, (alice, bob, carol) = sale
    ticket = _admitted(http, alice, event)
    token = ticket["admissionToken"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == alice.id and claims["event"] == event
    assert _admitted(http, alice, event)["admissionToken"] == token  # the same token on re-reads

    held = _hold(http, alice, event, token, ["A-1-1", "A-1-2"])
    assert held.status_code == 200, held.text
    assert held.json()["seatIds"] == ["A-1-1", "A-1-2"]
    taken = _hold(http, alice, event, token, ["A-1-2", "A-1-3"])
    assert taken.status_code == 409 and taken.json()["details"][0]["reason"] == "SEAT_UNAVAILABLE"
    # Nonsense seat ids are a 400 with the reason, however long: the answer that repeats them is
    # cut (a 24,000-character one made it too large for the edge, a 503), and nothing is held.
    for bad in (["Z" * 24_000], ["A-\u00b2-1"], [f"A-1-{n}" + "x" * 1500 for n in range(50)]):
        refused = _hold(http, alice, event, token, bad)
        assert refused.status_code == 400, refused.text[:300]
        assert refused.json()["details"][0]["reason"] in ("UNKNOWN_SEAT", "TOO_MANY_SEATS",
                                                          "INVALID_SEAT_IDS"), refused.text[:300]

    # Bob with Alice's admission token: the edge lets it through (both tokens valid), booking not.
    stolen = _hold(http, bob, event, token, ["A-2-1"])
    assert stolen.status_code == 403, stolen.text
    assert stolen.json()["details"][0]["reason"] == "ADMISSION_WRONG_USER"
    # No admission token at all: the edge refuses.
    assert http.post(f"/v1/{event}/holds", json={"seatIds": ["A-2-1"]}, headers=bob.auth).status_code == 401


def test_best_available_through_the_edge(http: httpx.Client, admin: Fan):
    """`{"quantity": n}` instead of seat ids: booking picks n free seats side by side, or says why
    not (409 NO_SEATS_TOGETHER, 400 for a section the event does not have)."""
    event = _sale(http, admin, opens_in=1, rows=1, seats_per_row=4, seatLimitPerFan=4)
    fan = sign_up(http)
    assert http.post(f"/v1/{event}/queue:join", json={}, headers=fan.auth).status_code == 200
    admitted = {**fan.auth, "x-admission-token": _admitted(http, fan, event)["admissionToken"]}

    def best(body: dict) -> httpx.Response:
        return http.post(f"/v1/{event}/holds", json={**body, "requestId": str(uuid.uuid4())},
                         headers=admitted)

    named = _hold(http, fan, event, admitted["x-admission-token"], ["A-1-2"])  # picked on the map
    assert named.status_code == 200, named.text
    for body, status, reason in (({"quantity": 3}, 409, "NO_SEATS_TOGETHER"),
                                 ({"quantity": 1, "section": "Z"}, 400, "UNKNOWN_SECTION"),
                                 ({"quantity": 1, "seatIds": ["A-1-4"]}, 400, "SEATS_OR_QUANTITY")):
        refused = best(body)
        assert (refused.status_code, refused.json()["details"][0]["reason"]) == (status, reason), refused.text
    assert best({"quantity": 3}).json()["details"][0]["metadata"] == {"quantity": "3", "longest_run": "2"}
    held = best({"quantity": 2})
    assert held.status_code == 200, held.text
    assert (held.json()["seatIds"], held.json()["amount"]["units"]) == (["A-1-3", "A-1-4"], "2000")
    assert best({"quantity": 1, "section": "A"}).json()["seatIds"] == ["A-1-1"]


def test_an_admission_for_one_event_does_not_open_another(http: httpx.Client, admin: Fan, sale):
    event, (alice, *_) = sale
    token = _admitted(http, alice, event)["admissionToken"]
    other = _sale(http, admin, opens_in=1)
    resp = _hold(http, alice, other, token, ["A-1-1"])
    assert resp.status_code == 403, resp.text
    assert resp.json()["details"][0]["reason"] == "ADMISSION_WRONG_EVENT"


def _check_admission_calls(mesh: Layout) -> float:
    """How many CheckAdmission calls the waiting room has served (its /metrics)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{mesh.service('queue').metrics_port}/metrics",
                                  timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith("grpc_server_started_total{")
               and 'grpc_method="CheckAdmission"' in line)


def _past_fresh(token: str) -> None:
    """Sleep until booking no longer takes this admission token's own word (its iat plus
    booking's admission_cache_seconds, the test stack's default)."""
    issued = jwt.decode(token, options={"verify_signature": False})["iat"]
    fresh = BookingSettings.model_fields["admission_cache_seconds"].default
    time.sleep(max(0.0, issued + fresh + 1.1 - time.time()))


def test_a_fresh_admission_token_needs_no_call_to_the_waiting_room(http: httpx.Client, admin: Fan,
                                                                   mesh: Layout):
    """The edge passes the token's iat (an integer claim) to booking: a fan who holds right after
    being admitted is let in on the token's word; later, booking asks the waiting room."""
    event = _sale(http, admin, opens_in=1)
    fan = sign_up(http)
    assert http.post(f"/v1/{event}/queue:join", json={}, headers=fan.auth).status_code == 200
    token = _admitted(http, fan, event)["admissionToken"]
    before = _check_admission_calls(mesh)
    held = _hold(http, fan, event, token, ["A-1-1"])
    assert held.status_code == 200, held.text
    assert _check_admission_calls(mesh) == before
    _past_fresh(token)
    again = _hold(http, fan, event, token, ["A-1-2"])
    assert again.status_code == 200, again.text
    assert _check_admission_calls(mesh) == before + 1


def test_leaving_ends_the_session(http: httpx.Client, sale):
    """Once booking no longer takes the token's own word, the session's end is seen, and an iat
    the client sends itself changes nothing (the edge drops it and passes the token's)."""
    event, (_, _, carol) = sale
    token = _admitted(http, carol, event)["admissionToken"]
    left = http.post(f"/v1/{event}/queue:leave", json={}, headers=carol.auth)
    assert left.status_code == 200, left.text
    _past_fresh(token)
    resp = http.post(f"/v1/{event}/holds", json={"seatIds": ["A-2-5"], "requestId": str(uuid.uuid4())},
                     headers={**carol.auth, "x-admission-token": token,
                              "x-admission-iat": str(int(time.time()))})
    assert resp.status_code == 403 and resp.json()["details"][0]["reason"] == "NOT_ADMITTED"


def test_admins_tune_the_room_live(http: httpx.Client, admin: Fan, sale):
    event, (alice, *_) = sale
    body = {"maxActive": 7, "admitRatePerSecond": 3.5, "paused": True}
    fan_try = http.patch(f"/v1/{event}/queue", json=body, headers=alice.auth)
    assert fan_try.status_code == 403
    changed = http.patch(f"/v1/{event}/queue", params={"updateMask": "maxActive,admitRatePerSecond,paused"},
                         json=body, headers=admin.auth)
    assert changed.status_code == 200, changed.text
    assert (changed.json()["maxActive"], changed.json()["paused"]) == (7, True)
    time.sleep(1.2)  # past the edge's one-second cache
    status = http.get(f"/v1/{event}/queue").json()
    assert (status["maxActive"], status["admitRatePerSecond"], status["paused"]) == (7, 3.5, True)


def _until(check, within: float = 20.0, every: float = 0.2):
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)


def test_a_full_purchase_through_the_edge(http: httpx.Client, admin: Fan):
    """Join, get admitted, hold, order, pay; the sandbox PSP calls the signed webhook through
    Envoy; booking confirms; the seats are SOLD and the fan's slot is freed."""
    event = _sale(http, admin, opens_in=1)
    fan = sign_up(http)
    assert http.post(f"/v1/{event}/queue:join", json={}, headers=fan.auth).status_code == 200
    token = _admitted(http, fan, event)["admissionToken"]
    hold = _hold(http, fan, event, token, ["A-2-9", "A-2-10"])
    assert hold.status_code == 200, hold.text
    order = http.post("/v1/orders", json={"hold": hold.json()["name"], "requestId": str(uuid.uuid4())},
                      headers={**fan.auth, "x-admission-token": token})
    assert order.status_code == 200, order.text
    assert order.json()["state"].endswith("PENDING_PAYMENT")
    assert order.json()["amount"] == {"currencyCode": "KRW", "units": "2000", "nanos": 0}
    name = order.json()["name"]
    payment = http.post("/v1/payments", json={"order": name, "requestId": str(uuid.uuid4())},
                        headers=fan.auth)
    assert payment.status_code == 200, payment.text
    assert payment.json()["state"].endswith("PENDING") and payment.json()["providerReference"]
    # A fan's own answers are marked private by the edge (the services mark only public ones);
    # the room's public status keeps its own.
    mine = [order, payment, http.get(f"/v1/{name}", headers=fan.auth),
            http.get(f"/v1/{event}/queue/me", headers=fan.auth)]
    assert {r.headers.get("cache-control") for r in mine} == {"private, no-store"}
    assert http.get(f"/v1/{event}/queue").headers["cache-control"] == "public, max-age=1"

    # The app learns the outcome with one long poll (WaitOrder), answered when booking confirms.
    waited = http.get(f"/v1/{name}:wait", params={"timeout": "25s"}, headers=fan.auth, timeout=40)
    assert waited.status_code == 200, waited.text
    assert waited.headers["cache-control"] == "private, no-store"
    confirmed = waited.json()
    assert confirmed["state"].endswith("CONFIRMED") and confirmed["seatIds"] == ["A-2-9", "A-2-10"]
    assert http.get(f"/v1/{name}", headers=fan.auth).json() == confirmed
    paid = http.get(f"/v1/{payment.json()['name']}", headers=fan.auth).json()
    assert paid["state"].endswith("SUCCEEDED")
    listed = http.get(f"/v1/{event}/seats", headers={"cache-control": "no-cache"}).json()["seats"]
    seats = {s["seatId"]: s["status"] for s in listed}
    assert seats["A-2-9"].endswith("SOLD") and seats["A-2-10"].endswith("SOLD")
    # Another fan never sees this order.
    other = sign_up(http)
    assert http.get(f"/v1/{name}", headers=other.auth).status_code == 404
    assert http.get(f"/v1/{name}:wait", headers=other.auth).status_code == 404
    assert http.get(f"/v1/{name}:wait", params={"timeout": "31s"}, headers=fan.auth).json()[
        "details"][0]["reason"] == "INVALID_TIMEOUT"
    # The confirmed order ended the fan's session: the slot is free for the next fan.
    _until(lambda: not http.get(f"/v1/{event}/queue/me", headers=fan.auth).json()["state"].endswith("ACTIVE"))
