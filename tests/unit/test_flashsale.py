"""The flash-sale simulator's own logic: seat picks, the fairness measures, the report's checks."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from flashsale import report
from flashsale.sale import (
    Fan,
    Progress,
    SaleConfig,
    SaleResult,
    SeatMap,
    blocks,
    event_body,
    in_order_share,
    order_violations,
    pick,
)


def _fan(i: int, sent: float, done: float, number: int) -> Fan:
    return Fan(i, f"f{i}@example.com", "pw", join_sent=sent, join_done=done, number=number)


def test_the_seat_map_reads_compact_statuses_front_rows_first():
    m = SeatMap([{"section": "A", "seatsPerRow": 3, "statuses": "AHSAAA"},
                 {"section": "B", "seatsPerRow": 2, "statuses": "SA"}])
    assert m.seats("A") == ["A-1-1", "A-2-1", "A-2-2", "A-2-3", "B-1-2"]
    assert m.seats("S") == ["A-1-3", "B-1-1"]
    assert m.counts() == {"A": 5, "H": 1, "S": 2}


def test_a_pick_is_adjacent_seats_in_one_row_when_there_are_any():
    rng = random.Random(1)
    free = ["A-1-1", "A-1-3", "A-1-4", "A-2-7", "A-2-8", "A-2-9"]
    for _ in range(50):
        got = pick(free, 3, rng)
        assert got == ["A-2-7", "A-2-8", "A-2-9"]
    two = pick(free, 2, rng, spread=0.001)  # the very best block: the front row's pair
    assert two == ["A-1-3", "A-1-4"]
    # No pair left: single seats, the best of them for a fan who wants the best
    assert pick(["A-1-1", "A-1-3", "B-4-9"], 2, rng, spread=0.001) == ["A-1-1", "A-1-3"]


def test_fans_without_a_block_left_spread_over_the_single_seats_instead_of_all_taking_the_same():
    free = [f"A-{r}-{2 * n}" for r in range(1, 6) for n in range(1, 5)]  # no two seats adjacent
    rng = random.Random(3)
    picks = [pick(free, 3, rng, spread=1e9) for _ in range(400)]
    for got in picks:
        assert len(set(got)) == 3 and set(got) <= set(free)
        assert got == sorted(got, key=free.index)  # front first, as the map lists them
    firsts = {got[0] for got in picks}
    assert len({tuple(got) for got in picks}) > 300 and len(firsts) > 10  # not one convoy
    near_front = [pick(free, 2, rng, spread=2) for _ in range(400)]
    assert sum(free.index(s) < 8 for got in near_front for s in got) > 0.9 * 800  # the best, mostly


def test_a_maps_free_blocks_are_worked_out_once_and_less_the_taken_seats_are_the_same_pick():
    m = SeatMap([{"section": "A", "seatsPerRow": 4, "statuses": "AAAHAAAA"},
                 {"section": "B", "seatsPerRow": 3, "statuses": "ASA"}])
    assert m.free_blocks(2) == [["A-1-1", "A-1-2"], ["A-1-2", "A-1-3"], ["A-2-1", "A-2-2"],
                                ["A-2-2", "A-2-3"], ["A-2-3", "A-2-4"]]
    assert m.free_blocks(2) is m.free_blocks(2)
    taken = {"A-1-2", "A-2-4"}
    free = [s for s in m.seats("A") if s not in taken]
    among = [b for b in m.free_blocks(2) if taken.isdisjoint(b)]
    assert among == blocks(free, 2)
    for seed in range(20):
        assert (pick(free, 2, random.Random(seed), among=among)
                == pick(free, 2, random.Random(seed)))


def test_a_fan_who_lost_races_spreads_further_back():
    free = [f"A-{r}-{n}" for r in range(1, 21) for n in range(1, 3)]  # one pair per row
    rng = random.Random(2)
    first_try = {pick(free, 2, rng)[0] for _ in range(300)}
    after_losses = {pick(free, 2, rng, spread=40)[0] for _ in range(300)}
    assert len(after_losses) > len(first_try)


def test_fifo_order_is_judged_only_between_joins_that_did_not_overlap():
    fans = [_fan(0, 0.0, 1.0, 1), _fan(1, 0.5, 1.5, 3), _fan(2, 0.6, 1.2, 2), _fan(3, 2.0, 2.1, 4)]
    # 1 and 2 overlapped (either number is fair); 3 came after all of them and got the highest.
    assert order_violations(fans) == (0, 1)
    fans.append(_fan(4, 3.0, 3.1, 2))  # joined last, numbered before three earlier fans
    assert order_violations(fans) == (1, 2)


def test_the_in_order_share_tells_fifo_from_a_shuffle():
    rng = random.Random(3)
    fifo = [_fan(i, i, i + 0.5, i + 1) for i in range(200)]
    assert in_order_share(fifo, rng) == 1.0
    numbers = list(range(1, 201))
    rng.shuffle(numbers)
    shuffled = [_fan(i, i, i + 0.5, n) for i, n in enumerate(numbers)]
    assert 0.4 < in_order_share(shuffled, rng) < 0.6


@pytest.mark.parametrize(("seats", "expected"), [
    (500, [("A", 4, 25), ("B", 16, 25)]),
    (60, [("A", 1, 25), ("B", 1, 25), ("C", 1, 10)]),
    (7, [("C", 1, 7)]),
])
def test_the_event_has_exactly_the_seats_asked_for(seats: int, expected: list[tuple[str, int, int]]):
    now = datetime.now(UTC)
    body = event_body(SaleConfig(seats=seats), now, now + timedelta(seconds=5))
    got = [(s["name"], s["rows"], s["seatsPerRow"]) for s in body["seatMap"]["sections"]]
    assert got == expected
    assert sum(r * n for _, r, n in got) == seats
    assert body["queueOpenTime"] < body["saleOpenTime"]


def test_percentiles_and_the_health_verdict():
    assert report.percentile([3, 1, 2, 4], 0.5) == 2
    assert report.percentile([float(i) for i in range(1, 101)], 0.99) == 99
    good = {"oversold": 0, "paid_without_confirmation": 0, "confirmed_but_not_sold": 0,
            "fairness": {"late_out_of_join_order": 0, "early_all_before_late": True}}
    assert report.healthy(good)
    assert not report.healthy({**good, "oversold": 1})
    assert not report.healthy({**good, "paid_without_confirmation": 2})
    assert not report.healthy({**good, "fairness": {"late_out_of_join_order": 0,
                                                    "early_all_before_late": False}})


def test_fans_turned_away_once_sold_out_have_no_place_to_judge():
    # Opening at t=10. Two lottery entrants, two FIFO arrivals, then two fans who joined after the
    # house sold out: the room gave them no number (0), which is not a place ahead of anybody.
    fans = [_fan(0, 1.0, 1.1, 2), _fan(1, 2.0, 2.1, 1), _fan(2, 11.0, 11.1, 3),
            _fan(3, 12.0, 12.1, 4), _fan(4, 13.0, 13.1, 0), _fan(5, 14.0, 14.1, 0)]
    for f in fans[4:]:
        f.outcome = "sold_out"
    result = SaleResult(SaleConfig(), "http://edge", "events/e", 4, 10.0, fans, 12.5, 15.0, Progress())
    fair = report.summary(result, report.Checked())["fairness"]
    assert (fair["early_joiners"], fair["late_joiners"]) == (2, 2)
    assert fair["early_all_before_late"] is True
    assert (fair["late_out_of_join_order"], fair["late_pairs_checked"]) == (0, 1)


def test_tickets_per_minute_count_from_the_opening_or_the_first_arrival_whichever_is_later():
    # Opening at t=10; the first fan arrives at 10.5; the last of 120 tickets is confirmed at 22.5.
    fans = [_fan(0, 10.5, 10.6, 1), _fan(1, 11.0, 11.1, 2)]
    result = SaleResult(SaleConfig(), "http://edge", "events/e", 200, 10.0, fans, None, 23.0, Progress())
    checked = report.Checked(tickets_confirmed=120, last_confirmed_at=22.5)
    s = report.summary(result, checked)
    assert s["tickets_per_minute"] == pytest.approx(120 / 12 * 60)
    assert s["tickets_per_minute_from_opening"] == pytest.approx(120 / 12.5 * 60)
    # Fans in the room before the opening: the sale starts at the opening.
    early = [_fan(0, 5.0, 5.1, 1), _fan(1, 11.0, 11.1, 2)]
    result = SaleResult(SaleConfig(), "http://edge", "events/e", 200, 10.0, early, None, 23.0, Progress())
    s = report.summary(result, checked)
    assert s["tickets_per_minute"] == s["tickets_per_minute_from_opening"] == pytest.approx(120 / 12.5 * 60)
