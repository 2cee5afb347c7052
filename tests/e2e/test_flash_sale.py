"""A whole flash sale through the edge (flashsale, as `make demo` runs it, smaller): every fan a
real account, every seat bought through the waiting room, holds, orders and the sandbox PSP, and
the report's checks read back from the servers."""

from __future__ import annotations

import asyncio

import pytest

from flashsale import report
from flashsale.sale import FanPool, SaleConfig, run

from .conftest import Fan

pytestmark = pytest.mark.e2e


def test_a_flash_sale_sells_every_seat_once_and_fairly(edge_url: str, admin: Fan):
    # Which fans reach a payment is the room's lottery and the race for seats, not the seed: with
    # a fifth of the cards declined, about 17 payers all had good cards one run in fifty (0.8^17);
    # with 0.35, one in 1,500 (0.65^17).
    cfg = SaleConfig(fans=90, seats=40, admit_rate=30, max_active=25, lead_seconds=3,
                     arrival_seconds=2, decline_share=0.35, give_up_seconds=4, max_seconds=120, seed=11)
    result = asyncio.run(run(edge_url, (admin.email, admin.password), cfg, pool=FanPool(None),
                             fresh_fans=True))
    checked = asyncio.run(report.check(result))
    s = report.summary(result, checked)
    assert report.healthy(s), report.render(s)
    assert s["seats_sold"] == 40 and s["tickets_confirmed"] == 40, report.render(s)
    assert s["time_to_sell_out_seconds"] is not None
    assert s["errors"] == [], report.render(s)
    # Declined cards: those orders were cancelled, their seats sold to someone else.
    assert s["payments"].get("FAILED", 0) >= 1 and s["orders"].get("CANCELLED", 0) == s["payments"]["FAILED"]
    assert s["payments"]["SUCCEEDED"] == s["orders"]["CONFIRMED"] == s["outcomes"]["bought"]
    fair = s["fairness"]
    assert fair["early_all_before_late"] is True and fair["late_out_of_join_order"] == 0
    assert fair["late_pairs_checked"] > 0
    # Once the seats were gone the room said so to those still waiting.
    assert s["outcomes"].get("sold_out", 0) > 0
