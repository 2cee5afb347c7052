"""An in-process read cache: TTL, bounded size, one load per key at a time, safe invalidation.

Correctness on writes: :meth:`ReadCache.invalidate` bumps a generation; a load that started
before the bump does not store its (possibly stale) answer, and later readers do not join it.
So once a write has committed and invalidated (in this process directly, in the others through
PostgreSQL NOTIFY), every read that starts afterwards sees the write. The TTL only bounds
staleness when a notification is lost (the listener's connection dropped).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class _Entry(Generic[V]):
    value: V
    expires: float


class ReadCache(Generic[K, V]):
    def __init__(
        self,
        ttl: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._inflight: dict[K, asyncio.Future[V]] = {}
        self._generation = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        entry = self._entries.get(key)
        if entry is not None:
            if entry.expires > self._clock():
                self.hits += 1
                return entry.value
            del self._entries[key]
        inflight = self._inflight.get(key)
        if inflight is not None:  # someone is loading it: share that one round trip
            self.hits += 1
            try:
                return await asyncio.shield(inflight)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if inflight.cancelled() and not (task and task.cancelling()):
                    return await self.get(key, load)  # the loader was cancelled, not us: retry
                raise
        self.misses += 1
        generation = self._generation
        fut: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            value = await load()
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        finally:
            if self._inflight.get(key) is fut:
                del self._inflight[key]
        fut.set_result(value)
        if generation == self._generation and self.ttl > 0:
            self._entries[key] = _Entry(value, self._clock() + self.ttl)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def invalidate(self, key: K | None = None) -> None:
        """Forget ``key`` (None: everything); loads already under way will not be stored."""
        self._generation += 1
        if key is None:
            self._entries.clear()
            self._inflight.clear()
        else:
            self._entries.pop(key, None)
            self._inflight.pop(key, None)
