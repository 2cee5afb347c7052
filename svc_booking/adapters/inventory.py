"""The live seat state of each event in Redis, every key under one hash tag ``{inv:<event>}``.

Keys (one slot per event, so every script works on Redis Cluster):
  ``{inv:<e>}:meta``       hash: limit (seats per fan), built (ms), stamp (this build's id, also in
                           PostgreSQL's events.live_stamp): present iff the state is built
  ``{inv:<e>}:seats``      hash: seat id -> "A" available | "H<hold id>" held | "S" sold
  ``{inv:<e>}:deadlines``  sorted set: hold id -> deadline (ms); the sweeper reads it
  ``{inv:<e>}:fans``       hash: user id -> seats counted against the per-fan limit
  ``{inv:<e>}:runs``       hash: "<section>-<row>" -> the longest run of free seats side by side
                           in the row, exact when present (a change to the row drops it, a
                           best-available pick that reads the row writes it; hold.lua)
  ``{inv:<e>}:hold:<h>``   hash: user, seats, exp, created (a hold's record while it lives)
  ``{inv:<e>}:req:<u>:<r>`` string: the hold id a (user, request id) made (idempotent retries)

And one key of its own slot, for the sweepers of every replica:
  ``booking:sweep``        sorted set: event id -> when (ms) a sweeper should look at the event's
                           deadlines next. An event enters it before its live state is built, so
                           every hold (made only on a built state) is covered; a sweep moves the
                           event to its earliest remaining deadline, or a while later if it has
                           none. Sweepers look only at the events due, not at every event ever sold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meshkit.redis import AnyRedis

from ..domain.model import BestAvailable

LUA = Path(__file__).parent / "lua"


def _tag(event_id: str) -> str:
    return "{inv:" + event_id + "}"


SWEEP_KEY = "booking:sweep"


def meta_key(event_id: str) -> str:
    return _tag(event_id) + ":meta"


def seats_key(event_id: str) -> str:
    return _tag(event_id) + ":seats"


def deadlines_key(event_id: str) -> str:
    return _tag(event_id) + ":deadlines"


def fans_key(event_id: str) -> str:
    return _tag(event_id) + ":fans"


def runs_key(event_id: str) -> str:
    return _tag(event_id) + ":runs"


def hold_key(event_id: str, hold_id: str) -> str:
    return f"{_tag(event_id)}:hold:{hold_id}"


def request_key(event_id: str, user_id: str, request_id: str) -> str:
    return f"{_tag(event_id)}:req:{user_id}:{request_id}"


@dataclass(frozen=True)
class HoldResult:
    outcome: str  # OK, NOINV, DUP, UNKNOWN, TAKEN, LIMIT, NONE
    # OK: (stamp of the state the hold was made on, the seats held...); NONE: (the longest run
    # of free seats side by side where the best-available pick looked,)
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """What PostgreSQL says the live state is (input of a rebuild)."""

    limit: int
    seat_values: dict[str, str]  # every seat -> "A" | "H<hold>" | "S"
    deadlines: dict[str, int]  # live hold id -> deadline ms
    fans: dict[str, int]  # user -> seats counted
    requests: dict[tuple[str, str], str]  # (user, request id) -> live hold id


# Drop a build's meta (so the next call builds again) unless a newer build replaced it.
_FORGET_BUILD = """
if redis.call('HGET', KEYS[1], 'stamp') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# The stamp of the build in which every given seat is held by this hold; nil if one is not (or
# the state has no build).
_HELD_STAMP = """
local held = 'H' .. ARGV[1]
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) ~= held then return false end
end
return redis.call('HGET', KEYS[1], 'stamp') or false
"""


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class Inventory:
    def __init__(self, redis: AnyRedis) -> None:
        self.redis = redis
        self._hold = redis.register_script((LUA / "hold.lua").read_bytes())
        self._release = redis.register_script((LUA / "release.lua").read_bytes())
        self._sell = redis.register_script((LUA / "sell.lua").read_bytes())
        self._claim = redis.register_script((LUA / "claim_due.lua").read_bytes())
        self._rebuild = redis.register_script((LUA / "rebuild.lua").read_bytes())
        self._forget = redis.register_script(_FORGET_BUILD)
        self._held_stamp = redis.register_script(_HELD_STAMP)

    async def hold(
        self, event_id: str, user_id: str, hold_id: str, request_id: str,
        seats: Sequence[str] | BestAvailable, now_ms: int, expire_ms: int, keep_ms: int,
    ) -> HoldResult:
        """Hold the named seats, or the best free ones (hold.lua)."""
        keys = [meta_key(event_id), seats_key(event_id), deadlines_key(event_id),
                fans_key(event_id), request_key(event_id, user_id, request_id),
                hold_key(event_id, hold_id), runs_key(event_id)]
        wanted: list[str | int] = [*seats] if not isinstance(seats, BestAvailable) else \
            ["", seats.quantity, *(v for s in seats.sections for v in (s.name, s.rows, s.seats_per_row))]
        out = await self._hold(keys=keys, args=[user_id, hold_id, now_ms, expire_ms, keep_ms, *wanted])
        values = tuple(_s(v) for v in out)
        return HoldResult(values[0], values[1:])

    async def release(self, event_id: str, hold_id: str, user_id: str, seats: Sequence[str],
                      *, request_id: str | None = None) -> int:
        """Free the hold's seats; with request_id, also forget that request (the hold is taken
        back before it was written down: a retry of the request is a new attempt)."""
        keys = [seats_key(event_id), deadlines_key(event_id), fans_key(event_id),
                hold_key(event_id, hold_id), runs_key(event_id)]
        if request_id is not None:
            keys.append(request_key(event_id, user_id, request_id))
        return int(await self._release(keys=keys, args=[hold_id, user_id, *seats]))

    async def sell(self, event_id: str, hold_id: str, seats: Sequence[str]) -> int:
        """Mark the seats SOLD; how many seats of the event are left unsold, -1 if not known."""
        keys = [meta_key(event_id), seats_key(event_id), deadlines_key(event_id),
                hold_key(event_id, hold_id)]
        return int(await self._sell(keys=keys, args=[hold_id, *seats]))

    async def claim_due(self, event_id: str, now_ms: int, lease_ms: int,
                        batch: int) -> tuple[list[str], int | None]:
        """The holds of the event past their deadline, leased to this sweeper for lease_ms; and
        the earliest deadline (or lease's end) left in the event after that, None if none."""
        first, *due = await self._claim(keys=[deadlines_key(event_id)], args=[now_ms, lease_ms, batch])
        return [_s(v) for v in due], None if first is None else int(float(_s(first)))

    async def defer(self, event_id: str, hold_id: str, at_ms: int) -> None:
        """The hold's deadline moves to at_ms (if it still has one: a sale or release removed it)."""
        await self.redis.zadd(deadlines_key(event_id), {hold_id: at_ms}, xx=True)

    async def sweep_at(self, event_ids: Sequence[str], at_ms: int) -> None:
        """Sweep these events at at_ms, or earlier if one is already due earlier."""
        if event_ids:
            await self.redis.zadd(SWEEP_KEY, dict.fromkeys(event_ids, at_ms), lt=True)

    async def sweep_next(self, event_id: str, at_ms: int) -> None:
        """After a sweep of the event: look at it again at at_ms."""
        await self.redis.zadd(SWEEP_KEY, {event_id: at_ms})

    async def sweep_forget(self, event_id: str) -> None:
        """The event leaves the sweep index (it has nothing that can expire)."""
        await self.redis.zrem(SWEEP_KEY, event_id)

    async def due_for_sweep(self, now_ms: int, limit: int) -> list[str]:
        raw = await self.redis.zrangebyscore(SWEEP_KEY, "-inf", now_ms, start=0, num=limit)
        return [_s(v) for v in raw if isinstance(v, bytes | str)]

    async def hold_record(self, event_id: str, hold_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(hold_key(event_id, hold_id))  # type: ignore[misc]
        return {_s(k): _s(v) for k, v in raw.items()}

    async def held_stamp(self, event_id: str, hold_id: str, seats: Sequence[str]) -> str | None:
        """The stamp of the live state if every seat in ``seats`` is held by this hold in it;
        None if one is not, or the state is not built."""
        if not seats:
            return None
        out = await self._held_stamp(keys=[meta_key(event_id), seats_key(event_id)], args=[hold_id, *seats])
        return None if out is None else _s(out)

    async def is_built(self, event_id: str) -> bool:
        return bool(await self.redis.exists(meta_key(event_id)))

    async def statuses(self, event_id: str) -> dict[str, str] | None:
        """Every seat's value, or None when the live state is not built."""
        raw = await self.redis.hgetall(seats_key(event_id))  # type: ignore[misc]
        if not raw:
            return None
        return {_s(k): _s(v) for k, v in raw.items()}

    async def rebuild(self, event_id: str, snap: Snapshot, now_ms: int, keep_ms: int,
                      stamp: str) -> bool:
        """Write the snapshot, stamped, unless the state exists; True if this call built it."""
        seat_args: list[str | int] = []
        for sid, v in snap.seat_values.items():
            seat_args += [sid, v]
        dl_args: list[str | int] = []
        for hid, ms in snap.deadlines.items():
            dl_args += [ms, hid]
        fan_args: list[str | int] = []
        for user, count in snap.fans.items():
            fan_args += [user, count]
        reqs = list(snap.requests.items())
        args = [snap.limit, now_ms, stamp, len(seat_args), *seat_args, len(dl_args), *dl_args,
                len(fan_args), *fan_args, keep_ms, *(hid for _, hid in reqs)]
        keys = [meta_key(event_id), seats_key(event_id), deadlines_key(event_id), fans_key(event_id),
                runs_key(event_id), *(request_key(event_id, user, rid) for (user, rid), _ in reqs)]
        return bool(await self._rebuild(keys=keys, args=args))

    async def forget_build(self, event_id: str, stamp: str) -> bool:
        """The build with this stamp is not the live state any more: the next call rebuilds."""
        return bool(await self._forget(keys=[meta_key(event_id)], args=[stamp]))
