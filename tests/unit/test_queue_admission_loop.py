"""The admission loop's schedule: when a room is ticked again (no Redis: a store that answers what
a tick would, and can be held mid-script)."""

from __future__ import annotations

import asyncio

from svc_queue.adapters.rooms import TickResult
from svc_queue.admission import AdmissionLoop


class Registry:
    def __init__(self, *rooms: str) -> None:
        self.rooms = list(rooms)

    async def members(self) -> list[str]:
        return list(self.rooms)  # a copy, as Redis answers

    async def remove(self, event_id: str) -> None:
        self.rooms.remove(event_id)

    async def add(self, event_id: str) -> bool:
        if event_id in self.rooms:
            return False
        self.rooms.append(event_id)
        return True


class IdleRooms:
    """Every room is idle (its tick asks for the next one 5 s later); `hold` keeps a tick's
    script "running" until released."""

    def __init__(self) -> None:
        self.ticks: list[str] = []
        self.hold: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def tick(self, event_id: str) -> TickResult:
        self.ticks.append(event_id)
        self.entered.set()
        if self.hold is not None:
            await self.hold.wait()
        return TickResult(0, 0, 0, 0, 0, False, wait_ms=5000)


async def test_an_idle_room_waits_and_a_poke_brings_it_back_on_the_next_round() -> None:
    rooms = IdleRooms()
    loop = AdmissionLoop(rooms, Registry("e1"), tick_seconds=0.01)  # type: ignore[arg-type]
    await loop.tick_all()
    await loop.tick_all()
    assert rooms.ticks == ["e1"]  # idle: not again before 5 s
    await loop.poke("e1")
    await loop.tick_all()
    assert rooms.ticks == ["e1", "e1"]


async def test_a_poke_while_the_rooms_tick_runs_outranks_the_ticks_idle_answer() -> None:
    # The tick's script found the room idle; a join landed (and poked) before its answer came
    # back. The answer is older than the join: the room must be ticked on the next round, not
    # 5 s later.
    rooms = IdleRooms()
    loop = AdmissionLoop(rooms, Registry("e1"), tick_seconds=0.01)  # type: ignore[arg-type]
    rooms.hold = asyncio.Event()
    running = asyncio.create_task(loop.tick_all())
    await rooms.entered.wait()
    await loop.poke("e1")
    rooms.hold.set()
    await running
    rooms.hold = None
    await loop.tick_all()
    assert rooms.ticks == ["e1", "e1"]


async def test_a_poked_room_missing_from_the_registry_is_registered_again_and_ticked() -> None:
    # The registry set was lost (on Redis Cluster it lives on another master than the rooms)
    # while the room's keys survived: fans still join and wait. Their pokes put the room back.
    rooms, registry = IdleRooms(), Registry()
    loop = AdmissionLoop(rooms, registry, tick_seconds=0.01)  # type: ignore[arg-type]
    await loop.tick_all()
    assert rooms.ticks == []
    await loop.poke("e1")
    assert registry.rooms == ["e1"]  # back before the poking call answers
    await loop.tick_all()
    assert (rooms.ticks, registry.rooms) == (["e1"], ["e1"])
    await loop.poke("e1")  # known now: no second SADD, ticked again on the next round
    await loop.tick_all()
    assert (rooms.ticks, registry.rooms) == (["e1", "e1"], ["e1"])


class ClosedRooms(IdleRooms):
    async def tick(self, event_id: str) -> TickResult:
        self.ticks.append(event_id)
        return TickResult(0, 0, 0, 0, 0, True)


async def test_a_closed_room_is_not_registered_again_by_a_late_reader() -> None:
    # The show started: the loop retires the room. A fan still polling queue/me pokes it; that
    # must not put it back (a SADD, a warning and a tick to retire it again, on every poll).
    rooms, registry = ClosedRooms(), Registry("e1")
    loop = AdmissionLoop(rooms, registry, tick_seconds=0.01)  # type: ignore[arg-type]
    await loop.tick_all()
    assert (rooms.ticks, registry.rooms) == (["e1"], [])
    loop._events_at = float("-inf")  # the next round reads the registry again
    await loop.tick_all()
    await loop.poke("e1")
    await loop.tick_all()
    assert (rooms.ticks, registry.rooms) == (["e1"], [])
