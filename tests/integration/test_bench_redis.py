"""The Redis baselines of `make bench` run against the stack's own Redis: what they write must not
stay there (the join-shaped run left up to a million keys, without a TTL, after every run)."""

from __future__ import annotations

import shutil

import pytest
import redis

from bench import booking as booking_bench
from bench import queue as queue_bench
from devstack.layout import Layout

pytestmark = pytest.mark.skipif(shutil.which("redis-benchmark") is None,
                                reason="redis-benchmark (Debian redis-tools) is not installed")


def test_the_join_shaped_baseline_leaves_no_keys_behind(infra: Layout) -> None:
    r = redis.Redis.from_url(infra.redis_url)
    try:
        r.set("{q:bench-neighbour}:keep", "1")  # a key outside the pattern stays
        result = queue_bench.redis_benchmark(infra, 1, 8, keyspace=5_000)
        assert result.requests_per_second > 0
        assert list(r.scan_iter(match="{q:bench}:*", count=1000)) == []
        assert r.get("{q:bench-neighbour}:keep") == b"1"
    finally:
        r.delete("{q:bench-neighbour}:keep")
        r.close()


def test_the_hold_script_baseline_runs_booking_s_script_and_leaves_no_keys_behind(infra: Layout) -> None:
    """booking's own hold.lua, as redis-benchmark sends it (its seat ids are not booking's: the
    script must take them too; a row's run it cannot name is not there to drop)."""
    r = redis.Redis.from_url(infra.redis_url)
    try:
        result = booking_bench._redis_hold_script(infra, 1, 8)
        assert result.requests_per_second > 0
        assert list(r.scan_iter(match="{inv:bench-*", count=1000)) == []
    finally:
        r.close()


def test_drop_keys_deletes_every_match_past_one_batch(infra: Layout) -> None:
    r = redis.Redis.from_url(infra.redis_url)
    try:
        with r.pipeline(transaction=False) as pipe:
            for n in range(2_500):
                pipe.set(f"{{q:bench}}:u:{n}", n)
            pipe.execute()
        assert queue_bench.drop_keys(infra, "{q:bench}:*") == 2_500
        assert list(r.scan_iter(match="{q:bench}:*", count=1000)) == []
    finally:
        r.close()


def test_rewrite_aof_rewrites_the_file_and_returns_once_it_is_done(infra: Layout) -> None:
    r = redis.Redis.from_url(infra.redis_url)
    try:
        before = int(r.info("persistence")["aof_rewrites"])
        took = queue_bench.rewrite_aof(infra)
        info = r.info("persistence")
        assert took >= 0 and int(info["aof_rewrites"]) == before + 1
        assert not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]
        assert info["aof_last_bgrewrite_status"] == "ok"
        r.bgrewriteaof()  # one already running when asked: that one is waited for
        queue_bench.rewrite_aof(infra)
        assert int(r.info("persistence")["aof_rewrites"]) >= before + 2
        assert not r.info("persistence")["aof_rewrite_in_progress"]
    finally:
        r.close()
