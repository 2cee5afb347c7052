"""The catalog through the edge, with the JSON of rest-api.md: admins set up a sale, fans browse."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from .conftest import Fan, sign_up

pytestmark = pytest.mark.e2e


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_json(title: str | None = None, *, start_in: timedelta = timedelta(days=30), **override) -> dict:
    now = datetime.now(UTC)
    body = {
        "title": title or f"Winter Tour - Seoul {uuid.uuid4().hex[:6]}",
        "artist": "The Edge Cases",
        "venue": {"name": "KSPO Dome", "address": "Seoul"},
        "startTime": _iso(now + start_in),
        "queueOpenTime": _iso(now + timedelta(minutes=5)),
        "saleOpenTime": _iso(now + timedelta(minutes=10)),
        "seatLimitPerFan": 4,
        "priceTiers": [{"name": "VIP", "price": {"currencyCode": "KRW", "units": "165000"}},
                       {"name": "R", "price": {"currencyCode": "KRW", "units": "132000"}}],
        "seatMap": {"sections": [{"name": "A", "rows": 10, "seatsPerRow": 20, "tier": "VIP"},
                                 {"name": "B", "rows": 30, "seatsPerRow": 40, "tier": "R"}]},
    }
    body.update(override)
    return body


def create(http: httpx.Client, admin: Fan, body: dict) -> httpx.Response:
    return http.post("/v1/events", json=body, headers=admin.auth)


def create_and_publish(http: httpx.Client, admin: Fan, body: dict) -> dict:
    created = create(http, admin, body)
    assert created.status_code == 200, created.text
    published = http.post(f"/v1/{created.json()['name']}:publish", json={}, headers=admin.auth)
    assert published.status_code == 200, published.text
    return published.json()


@pytest.fixture(scope="module")
def fan(http: httpx.Client, mesh) -> Fan:
    return sign_up(http)


def test_admin_sets_up_a_sale_and_fans_browse_it(http: httpx.Client, admin: Fan, fan: Fan):
    created = create(http, admin, event_json())
    assert created.status_code == 200, created.text
    draft = created.json()
    assert draft["state"] == "EVENT_STATE_DRAFT" and draft["name"].startswith("events/")
    # A draft is the admin's business only.
    assert http.get(f"/v1/{draft['name']}").status_code == 404
    assert http.get(f"/v1/{draft['name']}", headers=admin.auth).status_code == 200

    published = http.post(f"/v1/{draft['name']}:publish", json={}, headers=admin.auth)
    assert published.status_code == 200, published.text
    assert published.json()["state"] == "EVENT_STATE_PUBLISHED"
    # Only a draft changes: the request is fine, the event is not in a state to take it (412).
    late = http.patch(f"/v1/{draft['name']}", params={"updateMask": "title"}, json={"title": "x"},
                      headers=admin.auth)
    assert late.status_code == 412 and late.json()["details"][0]["reason"] == "EVENT_NOT_DRAFT", late.text

    one = http.get(f"/v1/{draft['name']}", headers=fan.auth)
    assert one.status_code == 200
    body = one.json()
    assert body["title"] == draft["title"] and body["seatLimitPerFan"] == 4
    assert body["priceTiers"][0]["price"] == {"currencyCode": "KRW", "units": "165000", "nanos": 0}
    assert "public" in one.headers["cache-control"]
    # Signed-in calls carry nothing of the edge's internals: no service timings, no timeouts.
    for resp in (one, published):
        assert not [h for h in resp.headers if h.lower().startswith("x-envoy-")], resp.headers
    names = [e["name"] for e in list_all(http)]
    assert names.count(draft["name"]) == 1


@pytest.mark.parametrize(("reason", "override"), [
    ("INVALID_TIMES", {"saleOpenTime": _iso(datetime.now(UTC) + timedelta(days=60))}),
    ("EMPTY_SEAT_MAP", {"seatMap": {"sections": []}}),
    ("NEGATIVE_PRICE", {"priceTiers": [{"name": "VIP", "price": {"currencyCode": "KRW", "units": "-1"}},
                                       {"name": "R", "price": {"currencyCode": "KRW", "units": "1"}}]}),
    ("UNKNOWN_TIER", {"seatMap": {"sections": [{"name": "A", "rows": 1, "seatsPerRow": 1,
                                                "tier": "GOLD"}]}}),
    ("SEAT_MAP_TOO_LARGE", {"seatMap": {"sections": [{"name": "A", "rows": 300, "seatsPerRow": 200,
                                                      "tier": "VIP"}]}}),
])
def test_bad_events_are_400_with_a_reason(http: httpx.Client, admin: Fan, reason: str, override: dict):
    title = f"bad {uuid.uuid4().hex[:8]}"
    resp = create(http, admin, event_json(title, **override))
    assert resp.status_code == 400, resp.text
    assert resp.json()["details"][0]["reason"] == reason


def test_a_name_in_the_body_cannot_redirect_a_call_to_another_resource(http: httpx.Client, admin: Fan):
    """With body "*", the transcoder let a body field override the same field bound from the path:
    PATCH /v1/events/A with {"name": "events/B"} changed B. A body that disagrees with its path
    is now 400; one that repeats the path's name is fine."""
    a = create(http, admin, event_json()).json()["name"]
    b = create(http, admin, event_json()).json()["name"]
    moved = http.patch(f"/v1/{a}", params={"updateMask": "title"}, json={"name": b, "title": "CHANGED"},
                       headers=admin.auth)
    assert moved.status_code == 400, moved.text
    assert http.get(f"/v1/{b}", headers=admin.auth).json()["title"] != "CHANGED"
    same = http.patch(f"/v1/{a}", params={"updateMask": "title"}, json={"name": a, "title": "kept"},
                      headers=admin.auth)
    assert same.status_code == 200 and same.json()["title"] == "kept", same.text
    published = http.post(f"/v1/{a}:publish", json={"name": b}, headers=admin.auth)
    assert published.status_code == 400, published.text
    assert http.get(f"/v1/{b}", headers=admin.auth).json()["state"] == "EVENT_STATE_DRAFT"


def test_long_urls_get_an_answer_of_their_own_not_a_429(http: httpx.Client):
    """The edge forwards the URL twice (x-envoy-original-path) and the services took 16 KiB of
    metadata: a 10 KiB URL was 429 "received metadata size exceeds hard limit", listing the
    edge's internal headers. Up to the edge's limit the service answers; past it, 431."""
    assert http.get("/v1/events", params={"pad": "a" * 10_000}).status_code == 200
    assert http.get(f"/v1/events/{'a' * 10_000}").status_code in (400, 404)
    too_long = http.get(f"/v1/events/{'a' * 20_000}")
    assert too_long.status_code == 431, too_long.text[:300]
    assert too_long.json()["details"][0]["reason"] == "HEADERS_TOO_LARGE"


def test_unknown_event_is_404(http: httpx.Client):
    resp = http.get(f"/v1/events/{uuid.uuid4()}")
    assert resp.status_code == 404
    assert resp.json()["details"][0]["reason"] == "EVENT_NOT_FOUND"


def list_all(http: httpx.Client, page_size: int = 50, between_pages=None) -> list[dict]:
    events, token, pages = [], "", 0
    while True:
        resp = http.get("/v1/events", params={"pageSize": page_size, "pageToken": token})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        events += body.get("events", [])
        token = body.get("nextPageToken", "")
        pages += 1
        if not token:
            return events
        if between_pages:
            between_pages(pages)


def test_pages_stay_stable_while_events_are_added(http: httpx.Client, admin: Fan):
    base = datetime.now(UTC)
    mine = [create_and_publish(http, admin, event_json(start_in=timedelta(days=400 + i)))["name"]
            for i in range(6)]
    added: list[str] = []

    def publish_more(page: int) -> None:
        if page <= 2:  # new events before and after the cursor, while the fan pages
            for days in (401.5, 420):
                added.append(create_and_publish(
                    http, admin, event_json(start_in=timedelta(days=days)))["name"])

    seen = [e["name"] for e in list_all(http, page_size=2, between_pages=publish_more)]
    assert len(seen) == len(set(seen)), "an event appeared twice"
    assert all(name in seen for name in mine), "an event published before paging was skipped"
    starts = [e["startTime"] for e in list_all(http)]
    assert starts == sorted(starts) and all(s > _iso(base) for s in starts)
