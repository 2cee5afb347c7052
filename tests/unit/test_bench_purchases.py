"""bench.purchases: several measured sales, reported by the median one, every sale beside it."""

from __future__ import annotations

from typing import Any

import pytest

from bench import purchases


def _sale(tpm: float, oversold: int = 0, unconfirmed: int = 0, error: str = "",
          purchase: tuple[float, float] = (8000.0, 12000.0)) -> dict[str, Any]:
    return {
        "fans": 800, "seats": 2000, "cpu_seconds": {"svc_booking": 1.0}, "cores": 2,
        "platform_cpu_ms_per_purchase": 600_000 / tpm, "load_generator_cpu_ms_per_purchase": 1.0,
        "projected_platform_only_tickets_per_minute": 2 * tpm, "tickets_confirmed": 1766,
        "tickets_per_minute": tpm, "tickets_per_minute_from_opening": tpm * 0.98,
        "purchases_per_minute": tpm / 2.2,
        "ratio_to_goal": tpm / purchases.GOAL_TICKETS_PER_MINUTE, "ratio_to_pretix": tpm / 400,
        "webhook_to_confirmed_ms": {"n": 800, "p50": tpm / 20, "p99": tpm / 10}, "steps_ms": {},
        "purchase_ms": {"n": 800, "p50": purchase[0], "p99": purchase[1]},
        "oversold": oversold, "paid_without_confirmation": unconfirmed, "errors": [error] if error else [],
    }


def test_the_median_sale_is_reported_and_every_sale_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = iter([_sale(9000), _sale(11000, oversold=1), _sale(10000, unconfirmed=2, error="boom")])
    monkeypatch.setattr(purchases, "warm_up", lambda *a: None)
    monkeypatch.setattr(purchases, "_sale", lambda *a, **k: next(runs))
    speeds = iter([60_000.0, 50_000.0])
    m = purchases.measure(None, ("a", "b"), sales=3, machine=lambda: next(speeds),  # type: ignore[arg-type]
                          capped_room_sale=False, best_available_sale=False)
    assert m["tickets_per_minute"] == 10000
    assert m["webhook_to_confirmed_ms"]["p50"] == 500  # the median sale's own figures
    assert [s["tickets_per_minute"] for s in m["sales"]] == [9000, 11000, 10000]
    # What must be 0 is counted over every sale, not the median's alone.
    assert (m["oversold"], m["paid_without_confirmation"], m["errors"]) == (1, 2, ["boom"])
    assert m["machine_direct_answers_per_second"] == {"before": 60_000.0, "after": 50_000.0}
    text = purchases.render(m)
    assert "3 sales of 800 fans" in text
    assert "9000 tickets/min at 67 ms, 11000 tickets/min at 55 ms, 10000 tickets/min at 60 ms" in text
    assert "counted from the opening 8820, 10780, 9800" in text
    assert "oversold 1, paid without confirmation 2 (all sales)" in text
    assert "speed changed by more than a tenth" in text


def test_an_even_number_of_sales_reports_the_lower_middle_one(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = iter([_sale(9000), _sale(12000)])
    monkeypatch.setattr(purchases, "_sale", lambda *a, **k: next(runs))
    m = purchases.measure(None, ("a", "b"), warmup_fans=0, sales=2,  # type: ignore[arg-type]
                          capped_room_sale=False, best_available_sale=False)
    assert m["tickets_per_minute"] == 9000
    with pytest.raises(ValueError, match="at least one"):
        purchases.measure(None, ("a", "b"), warmup_fans=0, sales=0)  # type: ignore[arg-type]


def test_the_capped_room_sale_is_reported_apart_and_checked_like_the_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One more sale with the room letting ROOM_MAX_ACTIVE fans shop at once: beside the figure,
    never the figure, and what must be 0 there counts too."""
    calls: list[tuple[int | None, bool]] = []

    def sale(*a: Any, max_active: int | None = None, best_available: bool = False,
             **k: Any) -> dict[str, Any]:
        calls.append((max_active, best_available))
        if best_available:
            return _sale(12000, unconfirmed=1)
        return _sale(7000, oversold=1, purchase=(2500.0, 5000.0)) if max_active else _sale(10000)

    monkeypatch.setattr(purchases, "_sale", sale)
    m = purchases.measure(None, ("a", "b"), warmup_fans=0, sales=3)  # type: ignore[arg-type]
    assert calls == [(None, False)] * 3 + [(purchases.ROOM_MAX_ACTIVE, False), (None, True)]
    assert m["tickets_per_minute"] == 10000 and m["capped_room"]["tickets_per_minute"] == 7000
    assert m["best_available"]["tickets_per_minute"] == 12000
    assert (m["oversold"], m["paid_without_confirmation"]) == (1, 1)
    assert (m["capped_room"]["max_active"], m["capped_room"]["admit_rate_per_second"]) == \
        (purchases.ROOM_MAX_ACTIVE, purchases.ROOM_ADMIT_RATE)
    text = purchases.render(m)
    assert ("room capped             7000 tickets/min at 86 ms, a purchase p50 2.5 s (p99 5.0 s) from"
            " admission to CONFIRMED, against p50 8.0 s (p99 12.0 s) in the median sale") in text
    assert f"at most {purchases.ROOM_MAX_ACTIVE} shopping at once" in text
    assert "best available          12000 tickets/min at 50 ms (one more sale" in text


def test_every_fan_is_let_in_at_once_but_in_the_capped_room_sale() -> None:
    wide = purchases._config(800, 2000, seed=1)
    capped = purchases._config(800, 2000, seed=1, max_active=purchases.ROOM_MAX_ACTIVE)
    assert wide.max_active == 800 and wide.admit_rate >= 800
    assert (capped.max_active, capped.admit_rate) == (purchases.ROOM_MAX_ACTIVE, purchases.ROOM_ADMIT_RATE)
    assert purchases._config(50, 200, seed=1, max_active=purchases.ROOM_MAX_ACTIVE).max_active == 50
    assert (wide.best_share, purchases._config(800, 2000, seed=1, best_available=True).best_share) == (0, 1)
