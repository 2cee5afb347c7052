"""The read cache: hits, TTL, one load per key, and no stale value stored after an invalidation."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from ticketping.catalog.v1 import catalog_service_pb2 as pb

from svc_catalog.cache import ReadCache
from svc_catalog.domain import paging
from svc_catalog.server import _PAGE_MEMO_LIMIT, CatalogServicer
from svc_catalog.service import Catalog

from .test_catalog_domain import NOW, _event, spec


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Source:
    def __init__(self) -> None:
        self.value = "v1"
        self.loads = 0
        self.gate: asyncio.Event | None = None

    async def load(self) -> str:
        self.loads += 1
        seen = self.value
        if self.gate is not None:
            await self.gate.wait()
        return seen


async def test_hits_until_the_ttl_or_an_invalidation() -> None:
    clock, src = Clock(), Source()
    cache: ReadCache[str, str] = ReadCache(5.0, 100, clock)
    for _ in range(100):
        assert await cache.get("k", src.load) == "v1"
    assert src.loads == 1 and cache.hits == 99
    src.value = "v2"
    clock.t = 4.9
    assert await cache.get("k", src.load) == "v1"
    clock.t = 5.1
    assert await cache.get("k", src.load) == "v2" and src.loads == 2
    src.value = "v3"
    cache.invalidate("k")
    assert await cache.get("k", src.load) == "v3" and src.loads == 3


async def test_concurrent_misses_share_one_load() -> None:
    src = Source()
    src.gate = asyncio.Event()
    cache: ReadCache[str, str] = ReadCache(5.0, 100)
    readers = [asyncio.create_task(cache.get("k", src.load)) for _ in range(50)]
    await asyncio.sleep(0.01)
    src.gate.set()
    assert await asyncio.gather(*readers) == ["v1"] * 50
    assert src.loads == 1


async def test_a_load_overtaken_by_a_write_is_not_stored() -> None:
    src = Source()
    src.gate = asyncio.Event()
    cache: ReadCache[str, str] = ReadCache(60.0, 100)
    slow = asyncio.create_task(cache.get("k", src.load))  # reads v1 ...
    await asyncio.sleep(0.01)
    src.value = "v2"  # ... a write commits ...
    cache.invalidate("k")  # ... and invalidates while that read is still under way
    after = asyncio.create_task(cache.get("k", src.load))  # a reader after the write: own load
    await asyncio.sleep(0.01)
    src.gate.set()
    assert await slow == "v1"
    assert await after == "v2"
    assert await cache.get("k", src.load) == "v2"  # the stale v1 was never stored
    assert src.loads == 2


async def test_errors_are_not_cached_and_reach_every_waiter() -> None:
    cache: ReadCache[str, Any] = ReadCache(5.0, 100)
    gate = asyncio.Event()
    calls = 0

    async def failing() -> Any:
        nonlocal calls
        calls += 1
        await gate.wait()
        raise RuntimeError("db down")

    tasks = [asyncio.create_task(cache.get("k", failing)) for _ in range(3)]
    await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results) and calls == 1

    async def ok() -> str:
        return "fine"

    assert await cache.get("k", ok) == "fine"


async def test_a_cancelled_loader_does_not_cancel_the_waiters() -> None:
    src = Source()
    src.gate = asyncio.Event()
    cache: ReadCache[str, str] = ReadCache(5.0, 100)
    owner = asyncio.create_task(cache.get("k", src.load))
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(cache.get("k", src.load))
    await asyncio.sleep(0.01)
    owner.cancel()  # e.g. its client went away
    await asyncio.sleep(0.01)
    src.gate.set()
    assert await waiter == "v1"
    with pytest.raises(asyncio.CancelledError):
        await owner


async def test_size_is_bounded() -> None:
    cache: ReadCache[int, int] = ReadCache(60.0, 10)
    for i in range(100):
        async def load(i: int = i) -> int:
            return i

        await cache.get(i, load)
    assert len(cache) == 10


async def test_made_up_page_tokens_hold_references_not_copies() -> None:
    """Page tokens are plain keyset cursors: anyone may send thousands of distinct ones, each a
    miss for the edge's cache. Their pages hold the same few real events (one object per version,
    whatever the database returned each time), and only a few built answers are kept."""
    events = [_event(spec(title=f"Tour {i}")) for i in range(20)]

    class Repo:
        async def list_published(self, after: Any, not_before: Any, limit: int) -> list[Any]:
            return [replace(e) for e in events[:limit]]  # fresh objects, as from the database

    class Context:
        def invocation_metadata(self) -> tuple[()]:
            return ()

        async def send_initial_metadata(self, metadata: Any) -> None:
            pass

    catalog = Catalog(Repo())  # type: ignore[arg-type]
    servicer = CatalogServicer(catalog)
    for k in range(2_000):
        token = paging.encode(paging.Cursor(NOW + timedelta(microseconds=k), events[0].id))
        answer = await servicer.ListEvents(pb.ListEventsRequest(page_size=100, page_token=token),
                                           Context())  # type: ignore[arg-type]
        assert len(answer.events) == 20
    assert len(servicer._pages) == _PAGE_MEMO_LIMIT
    pages = [entry.value for entry in catalog.pages._entries.values()]
    assert len(pages) == 1_000
    assert len({id(e) for page in pages for e in page.events}) == len(events)
