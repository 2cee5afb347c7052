"""svc_queue's rules without I/O: names, settings, room changes, the ETA, the admission token's
claims, the proto mapping, the Lua sources' key discipline."""

from __future__ import annotations

import math
import re
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError
from redis import exceptions as redis_errors
from ticketping.queue.v1 import queue_service_pb2 as pb

from meshkit.errors import DomainError, InvalidArgument, NotFound
from svc_queue.adapters.events import is_redis_unavailable
from svc_queue.adapters.rooms import LUA, ROOM_SCRIPTS, RoomKeys, marker_key, tag, ticket_key
from svc_queue.config import Settings
from svc_queue.domain import room as r
from svc_queue.server import queue_proto, ticket_proto

EVENT = "0b4c3a49-8a0e-4f7e-9d3c-1c2b3a4d5e6f"


# -- names ----------------------------------------------------------------------------------------


def test_names_give_the_canonical_event_id() -> None:
    assert r.parse_queue_name(f"events/{EVENT}/queue") == EVENT
    assert r.parse_queue_name(f"events/{EVENT.upper()}/queue") == EVENT  # one room, one hash tag
    assert r.parse_ticket_name(f"events/{EVENT}/queue/me") == EVENT
    assert r.parse_event_name(f"events/{EVENT}") == EVENT


@pytest.mark.parametrize("name", ["", "events", f"events/{EVENT}", f"events/{EVENT}/queue/x",
                                  f"event/{EVENT}/queue", "events//queue", f"events/{EVENT}/queue/"])
def test_malformed_queue_names_are_invalid_argument(name: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        r.parse_queue_name(name)
    assert exc.value.reason == "INVALID_NAME"


def test_an_id_that_is_not_a_uuid_cannot_exist() -> None:
    with pytest.raises(NotFound) as exc:
        r.parse_queue_name("events/e1/queue")
    assert exc.value.reason == "EVENT_NOT_FOUND"


def test_queue_not_open_is_412_with_the_time() -> None:
    err = r.QueueNotOpen(EVENT, 1_767_225_600_000)
    assert isinstance(err, DomainError) and err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "QUEUE_NOT_OPEN"
    assert err.metadata["queue_open_time"] == "2026-01-01T00:00:00.000Z"


# -- keys -----------------------------------------------------------------------------------------


def test_every_key_of_a_room_shares_its_hash_tag() -> None:
    keys = [*RoomKeys.of(EVENT).room(), ticket_key(EVENT, "u-1"), marker_key(EVENT, "e-1")]
    assert all(k.startswith(f"{{q:{EVENT}}}:") for k in keys)
    assert tag(EVENT) == f"{{q:{EVENT}}}"
    assert len(set(keys)) == len(keys)


def test_the_scripts_touch_only_the_keys_they_are_given() -> None:
    """Cluster safety: no script builds a key name itself; every redis.call names KEYS[...] or a
    local bound to KEYS (CFG, ST, ...)."""
    bound = {"CFG", "ST", "LOT", "LEFT", "PEND", "ACT", "STATS", "U", "mark", "KEYS", "k"}  # k: retain()
    for path in Path(LUA).glob("*.lua"):
        text = path.read_text()
        for call in re.findall(r"redis\.call\('([A-Z]+)',\s*([A-Za-z_\[\]0-9]+)", text):
            cmd, target = call
            if cmd in ("TIME",):
                continue
            assert target.split("[")[0] in bound, (path.name, cmd, target)
        assert "KEYS[" not in text or path.name in ("common.lua", "end_session.lua", "check.lua",
                                                    "store_token.lua", "configure.lua"), path.name
    assert set(ROOM_SCRIPTS) <= {p.stem for p in Path(LUA).glob("*.lua")}


# -- room settings --------------------------------------------------------------------------------


def test_update_paths_from_the_mask_or_the_body() -> None:
    assert r.update_paths([], {"max_active", "paused"}) == {"max_active", "paused"}
    assert r.update_paths(["maxActive", "admit_rate_per_second", "sessionTtl"], set()) == {
        "max_active", "admit_rate_per_second", "session_ttl"}
    with pytest.raises(InvalidArgument) as exc:
        r.update_paths(["serving_number"], set())
    assert exc.value.reason == "INVALID_UPDATE_MASK"


def _change(paths: set[str], **over: object) -> r.RoomChange:
    values: dict[str, object] = dict(max_active=10, rate=5.0, paused=True, session_ttl_ms=60_000,
                                     max_session_ttl_ms=1_800_000)
    values.update(over)
    return r.validate_change(paths, **values)  # type: ignore[arg-type]


def test_valid_changes_become_config_fields() -> None:
    change = _change({"max_active", "admit_rate_per_second", "paused", "session_ttl"})
    assert change.fields() == {"max": "10", "rate": "5.0", "paused": "1", "ttl": "60000"}
    assert _change({"paused"}, paused=False).fields() == {"paused": "0"}
    assert _change(set()).fields() == {}


@pytest.mark.parametrize(("paths", "over"), [
    ({"max_active"}, {"max_active": -1}),
    ({"admit_rate_per_second"}, {"rate": 0.0}),
    ({"admit_rate_per_second"}, {"rate": 1e-300}),  # a stopped room in disguise: pause it instead
    ({"admit_rate_per_second"}, {"rate": math.inf}),
    ({"admit_rate_per_second"}, {"rate": math.nan}),
    ({"session_ttl"}, {"session_ttl_ms": 500}),
    ({"session_ttl"}, {"session_ttl_ms": 1_800_001}),  # never longer than the cap
])
def test_invalid_changes_are_refused(paths: set[str], over: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument) as exc:
        _change(paths, **over)
    assert exc.value.reason == "INVALID_QUEUE_SETTING"


# -- the ETA --------------------------------------------------------------------------------------


def _eta(position: int, **over: object) -> int:
    values: dict[str, object] = dict(now_ms=100_000, sale_open_ms=50_000, configured_rate=10.0,
                                     paused=False, measured_rate=0.0, measured_at_ms=0,
                                     measuring_since_ms=0)
    values.update(over)
    return r.eta_seconds(r.TicketState.WAITING, position, **values)  # type: ignore[arg-type]


def test_eta_uses_the_configured_rate_until_measured_then_the_measured_one() -> None:
    assert _eta(100) == 10
    # measured for 30 s at 5/s (the EWMA has converged): 100 / 5
    assert _eta(100, measured_rate=5.0, measured_at_ms=100_000, measuring_since_ms=70_000) == 20
    # just after opening the EWMA is small but its start-up bias is corrected
    warm = 1 - math.exp(-3)
    assert _eta(100, measured_rate=5.0 * warm, measured_at_ms=100_000, measuring_since_ms=70_000) == 20
    # a stalled room (nothing admitted for long): the estimate grows
    stalled = _eta(100, measured_rate=5.0, measured_at_ms=40_000, measuring_since_ms=10_000)
    assert stalled > 20 * 100
    assert _eta(100, paused=True) == r.ETA_CAP_SECONDS


def test_eta_before_the_draw_is_the_time_until_the_sale_opens() -> None:
    assert _eta(0, sale_open_ms=130_500) == 31
    assert _eta(0, sale_open_ms=90_000) == 0  # served, about to be claimed
    assert r.eta_seconds(r.TicketState.ACTIVE, 5, now_ms=0, sale_open_ms=0, configured_rate=1,
                         paused=False, measured_rate=0, measured_at_ms=0, measuring_since_ms=0) == 0


# -- the token ------------------------------------------------------------------------------------


def test_admission_claims() -> None:
    claims = r.admission_claims(issuer="ticketping-queue", audience="ticketping-booking", user_id="u1",
                                event_id=EVENT, jti="j1", issued_ms=1_000_999, expire_ms=1_600_999)
    assert claims == {"iss": "ticketping-queue", "aud": "ticketping-booking", "sub": "u1",
                      "event": f"events/{EVENT}", "jti": "j1", "iat": 1000, "exp": 1600}


def test_ticket_proto_carries_the_token_only_while_active() -> None:
    t = r.Ticket(EVENT, r.TicketState.ACTIVE, 3, 0, 0, jti="j", expire_ms=1_700_000_000_123, token="tok")
    msg = ticket_proto(t)
    assert (msg.state, msg.number, msg.admission_token) == (pb.QUEUE_TICKET_STATE_ACTIVE, 3, "tok")
    assert msg.admission_expire_time.ToMilliseconds() == 1_700_000_000_123
    waiting = ticket_proto(r.Ticket(EVENT, r.TicketState.WAITING, 9, 4, 2, token="stale"))
    assert not waiting.admission_token and not waiting.HasField("admission_expire_time")
    assert (waiting.position, waiting.eta_seconds, waiting.event) == (4, 2, f"events/{EVENT}")


def test_queue_proto() -> None:
    q = queue_proto(r.RoomStatus(EVENT, 10, 90, 5, 2, 2.5, 50, True, 600_000, False))
    assert (q.name, q.serving_number, q.waiting_count, q.active_count) == (f"events/{EVENT}/queue", 10, 90, 5)
    assert (q.admit_rate_per_second, q.max_active, q.paused, q.session_ttl.seconds) == (2.5, 50, True, 600)


# -- settings and plumbing ------------------------------------------------------------------------


def _settings(**over: object) -> Settings:
    return Settings(redis_url="redis://x", kafka_bootstrap="k:1", **over)  # type: ignore[arg-type]


def test_settings_defaults_and_limits() -> None:
    s = _settings()
    assert (s.admission_issuer, s.admission_audience) == ("ticketping-queue", "ticketping-booking")
    assert (s.session_ttl_seconds, s.max_session_ttl_seconds, s.claim_window_seconds) == (600, 1800, 60)
    assert s.registry_key == "tp:queue:rooms" and s.keys_key == "tp:queue:admission-keys"
    assert s.kek is None
    assert _settings(key_encryption_key="A" * 43).kek == bytes(32)
    for bad in ({"key_encryption_key": "short"}, {"session_ttl_seconds": 4000},
                {"default_admit_rate_per_second": 0}, {"admission_tick_seconds": 5}):
        with pytest.raises(ValidationError):
            _settings(**bad)


def test_redis_outages_are_retried_not_parked() -> None:
    assert is_redis_unavailable(redis_errors.ConnectionError("down"))
    assert is_redis_unavailable(redis_errors.TimeoutError())
    assert not is_redis_unavailable(redis_errors.ResponseError("bad script"))
    assert not is_redis_unavailable(NotFound("EVENT_NOT_FOUND", "x"))
