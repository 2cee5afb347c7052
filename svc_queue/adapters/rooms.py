"""The waiting rooms in Redis: every mutation is one Lua script (EVALSHA) on one event's hash tag.

The scripts are in ``lua/`` (``common.lua`` is the shared prelude, with the key layout); this
module names the keys, runs the scripts and turns their replies into domain values. Each call is
one round trip, except the first read of a claimed session, which also stores its signed token.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.commands.core import AsyncScript

from meshkit.redis import AnyRedis

from ..domain.room import (
    EventNotFound,
    QueueClosed,
    QueueNotOpen,
    RoomDefaults,
    RoomStatus,
    Ticket,
    TicketState,
    eta_seconds,
    rate_now,
)

LUA = Path(__file__).with_name("lua")
ROOM_SCRIPTS = ("join", "ticket", "leave", "tick", "status", "update", "sold_out", "end_session")
PLAIN_SCRIPTS = ("check", "store_token", "configure")
# Lottery scores: 52 random bits, exact in a double (Redis sorted-set scores are doubles).
SCORE_BITS = 52


def tag(event_id: str) -> str:
    """The hash tag of one event's room: all its keys live in this one cluster slot."""
    return f"{{q:{event_id}}}"


@dataclass(frozen=True)
class RoomKeys:
    cfg: str
    st: str
    lot: str
    left: str
    pend: str
    act: str
    stats: str

    @classmethod
    def of(cls, event_id: str) -> RoomKeys:
        t = tag(event_id)
        return cls(f"{t}:cfg", f"{t}:st", f"{t}:lot", f"{t}:left", f"{t}:pend", f"{t}:act", f"{t}:stats")

    def room(self) -> list[str]:
        return [self.cfg, self.st, self.lot, self.left, self.pend, self.act, self.stats]


def ticket_key(event_id: str, user_id: str) -> str:
    return f"{tag(event_id)}:u:{user_id}"


def marker_key(event_id: str, envelope_id: str) -> str:
    return f"{tag(event_id)}:ev:{envelope_id}"


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _load(name: str, prelude: str | None) -> str:
    body = (LUA / f"{name}.lua").read_text()
    return f"{prelude}\n{body}" if prelude else body


@dataclass(frozen=True)
class TickResult:
    admitted: int
    serving: int
    skipped: int
    expired_sessions: int
    unclaimed: int
    closed: bool  # the show has started: the room needs no more ticks
    wait_ms: int = 0  # the room needs no tick before this (nobody waiting, or sale not open)
    missing: bool = False  # no such room (not published, or deleted)


@dataclass(frozen=True)
class TicketReply:
    ticket: Ticket
    fresh_claim: bool  # this read claimed the turn: the caller signs and stores the token


class RoomStore:
    """``max_in_flight`` bounds this replica's script calls in flight: a burst of requests queues
    here (in order) instead of opening a connection per request (redis-py's single-node pool
    raises MaxConnectionsError past 100 connections instead of waiting)."""

    def __init__(self, redis: AnyRedis, *, max_in_flight: int = 64) -> None:
        self.redis = redis
        self._gate = asyncio.Semaphore(max_in_flight)
        prelude = (LUA / "common.lua").read_text()
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(_load(name, prelude)) for name in ROOM_SCRIPTS
        }
        self._scripts |= {name: redis.register_script(_load(name, None)) for name in PLAIN_SCRIPTS}

    async def load_scripts(self) -> None:
        """SCRIPT LOAD every script (on every master of a cluster), so no call meets NOSCRIPT."""
        await asyncio.gather(*(self.redis.script_load(s.script) for s in self._scripts.values()))

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any] = ()) -> Any:
        async with self._gate:
            return await self._scripts[name](keys=list(keys), args=list(args))

    # -- the fan ----------------------------------------------------------------------------

    async def join(self, event_id: str, user_id: str) -> Ticket:
        score = secrets.randbits(SCORE_BITS)
        reply = await self._run("join", self._user_keys(event_id, user_id), [user_id, score])
        return self._ticket(event_id, reply).ticket

    async def ticket(self, event_id: str, user_id: str, jti: str) -> TicketReply:
        reply = await self._run("ticket", self._user_keys(event_id, user_id), [user_id, jti])
        return self._ticket(event_id, reply)

    async def leave(self, event_id: str, user_id: str) -> Ticket:
        reply = await self._run("leave", self._user_keys(event_id, user_id), [user_id])
        return self._ticket(event_id, reply).ticket

    async def store_token(self, event_id: str, user_id: str, jti: str, token: str) -> str | None:
        kept = await self._run("store_token", [ticket_key(event_id, user_id)], [jti, token])
        return None if kept is None else _text(kept)

    async def check(self, event_id: str, sessions: Sequence[tuple[str, str]]) -> list[int | None]:
        """For each (user, jti): the session's deadline (ms) if ``jti`` is the user's active
        session, else None; all in one script. Raises EventNotFound when some answer is "no" and
        the room itself does not exist."""
        reply = await self._run(
            "check", [RoomKeys.of(event_id).cfg, *(ticket_key(event_id, u) for u, _ in sessions)],
            [jti for _, jti in sessions])
        *found, room = (int(x) for x in reply)
        if not room:
            raise EventNotFound(event_id)
        return [exp or None for exp in found]

    async def end_session(
        self, event_id: str, user_id: str, *, to: str = "D", marker: str | None = None,
        happened_ms: int = 0, marker_ttl_ms: int = 7 * 24 * 3600 * 1000,
    ) -> tuple[bool, bool]:
        """(ended, duplicate). ``marker`` (a Kafka event id) makes a redelivery a no-op;
        ``happened_ms`` (the event's time) spares a session claimed after it."""
        keys = self._user_keys(event_id, user_id)
        if marker is not None:
            keys.append(marker_key(event_id, marker))
        ended, duplicate = await self._run(
            "end_session", keys, [user_id, to, marker_ttl_ms, happened_ms])
        return bool(int(ended)), bool(int(duplicate))

    # -- the room ---------------------------------------------------------------------------

    async def status(self, event_id: str) -> RoomStatus:
        return self._status(event_id, await self._run("status", RoomKeys.of(event_id).room()))

    async def window(self, event_id: str) -> tuple[int, int] | None:
        """(queue opens, room closes) in ms from the room's facts; None if there is no room.
        A close of 0 means none is known."""
        async with self._gate:
            qo, closes = await self.redis.hmget(RoomKeys.of(event_id).cfg, ["qo", "start"])  # type: ignore[misc]
        if qo is None:
            return None
        return int(qo), int(closes or 0)

    async def update(self, event_id: str, fields: dict[str, str]) -> RoomStatus:
        args = [x for kv in fields.items() for x in kv]
        return self._status(event_id, await self._run("update", RoomKeys.of(event_id).room(), args))

    async def mark_sold_out(self, event_id: str) -> RoomStatus:
        return self._status(event_id, await self._run("sold_out", RoomKeys.of(event_id).room()))

    async def tick(self, event_id: str) -> TickResult:
        reply = await self._run("tick", RoomKeys.of(event_id).room())
        if int(reply[0]) < 0:
            return TickResult(0, 0, 0, 0, 0, closed=False, missing=True)
        admitted, serving, skipped, expired, unclaimed, closed, wait = (int(x) for x in reply)
        return TickResult(admitted, serving, skipped, expired, unclaimed, bool(closed), wait)

    async def configure(
        self, event_id: str, *, queue_open_ms: int, sale_open_ms: int, closes_ms: int, seats: int,
        defaults: RoomDefaults,
    ) -> None:
        """Create (or confirm) a room from EventPublished: idempotent, keeps admin changes.
        ``closes_ms``: when the room stops taking fans in (the sale's end, or the show's start)."""
        await self._run("configure", [RoomKeys.of(event_id).cfg], [
            queue_open_ms, sale_open_ms, closes_ms, seats, defaults.max_active,
            repr(float(defaults.admit_rate_per_second)), defaults.session_ttl_ms,
            defaults.claim_window_ms,
        ])

    # -- replies ----------------------------------------------------------------------------

    def _user_keys(self, event_id: str, user_id: str) -> list[str]:
        return [*RoomKeys.of(event_id).room(), ticket_key(event_id, user_id)]

    @staticmethod
    def _error(event_id: str, reply: list[Any]) -> None:
        if reply and _text(reply[0]) == "ERR":
            reason = _text(reply[1])
            if reason == "QUEUE_NOT_OPEN":
                raise QueueNotOpen(event_id, int(reply[2]))
            if reason == "QUEUE_CLOSED":
                raise QueueClosed(event_id, int(reply[2]))
            raise EventNotFound(event_id)

    def _ticket(self, event_id: str, reply: list[Any]) -> TicketReply:
        self._error(event_id, reply)
        (state, number, position, jti, exp, token, fresh, now, sale_open, rate, paused,
         mr, mt, m0) = reply
        st = TicketState[_text(state)]
        ticket = Ticket(
            event_id=event_id,
            state=st,
            number=int(number),
            position=int(position),
            eta_seconds=eta_seconds(
                st, int(position), now_ms=int(now), sale_open_ms=int(sale_open),
                configured_rate=float(_text(rate)), paused=bool(int(paused)),
                measured_rate=float(_text(mr)), measured_at_ms=int(_text(mt)),
                measuring_since_ms=int(_text(m0)),
            ),
            jti=_text(jti),
            expire_ms=int(exp),
            token=_text(token),
            claimed_at_ms=int(now),
        )
        return TicketReply(ticket, bool(int(fresh)))

    def _status(self, event_id: str, reply: list[Any]) -> RoomStatus:
        self._error(event_id, reply)
        serving, waiting, active, rate, max_active, paused, ttl, sold, pending, now, mr, mt, m0 = reply
        return RoomStatus(
            event_id=event_id,
            serving_number=int(serving),
            waiting_count=max(0, int(waiting)),
            active_count=int(active),
            pending_count=int(pending),
            admit_rate_per_second=float(_text(rate)),
            max_active=int(max_active),
            paused=bool(int(paused)),
            session_ttl_ms=int(ttl),
            sold_out=bool(int(sold)),
            measured_rate=rate_now(float(_text(mr)), int(_text(mt)), int(_text(m0)), int(now)),
        )
