"""argon2id password hashing, run on a small thread pool so the event loop never blocks on it.

argon2-cffi releases the GIL while hashing, so the threads really run in parallel. The pool is
small and fixed on purpose: each hash holds ``memory_cost`` KiB while it runs (19 MiB with the
default settings), so a burst of sign-ups waits in the pool's queue instead of using a thread
(and its memory) each.
"""

from __future__ import annotations

import asyncio
import secrets
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


class Passwords:
    def __init__(self, *, time_cost: int, memory_cost_kib: int, parallelism: int, workers: int) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost_kib,
            parallelism=parallelism,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="argon2")
        self._dummy: str | None = None

    async def start(self) -> None:
        """Make the dummy hash verified for unknown emails (same parameters, so the same cost)."""
        self._dummy = await self.hash(secrets.token_urlsafe(24))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def hash(self, password: str) -> str:
        return await self._run(self._hasher.hash, password)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """True if ``password`` matches. ``stored_hash=None`` (no such user) verifies against a
        dummy hash, so an unknown email costs the same time as a wrong password."""
        target = stored_hash if stored_hash is not None else self._dummy
        assert target is not None, "Passwords.start() was not awaited"
        ok = await self._run(self._verify, target, password)
        return ok and stored_hash is not None

    def needs_rehash(self, stored_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except InvalidHashError:
            return True

    def _verify(self, stored_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
