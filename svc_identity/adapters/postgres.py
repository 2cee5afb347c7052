"""Users and refresh-token families in PostgreSQL.

Every method is one transaction (one ``pool.connection()`` block). Times that decide something
(a refresh token's expiry) come from the database's clock, so replicas agree.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from ..domain.tokens import RefreshVerdict, StoredRefreshToken, judge_refresh
from ..domain.users import Credentials, Role, User

_USER_COLUMNS = "id, email, display_name, role, created_at"


def _user(row: TupleRow) -> User:
    return User(id=row[0], email=row[1], display_name=row[2], role=Role(row[3]), create_time=row[4])


class UserRepository:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def email_taken(self, email: str) -> bool:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT 1 FROM users WHERE lower(email) = lower(%s)", (email,))
            return await cur.fetchone() is not None

    async def add(self, email: str, display_name: str, password_hash: str, role: Role) -> User | None:
        """Insert a user; None if the address is taken (the unique index on lower(email) decides,
        so concurrent sign-ups with one address make exactly one account)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                f"""
                INSERT INTO users (id, email, display_name, role, password_hash)
                VALUES (%s, %s, %s, %s, %s)
                ON CONFLICT ((lower(email))) DO NOTHING
                RETURNING {_USER_COLUMNS}
                """,
                (uuid.uuid4(), email, display_name, role.value, password_hash),
            )
            row = await cur.fetchone()
            return None if row is None else _user(row)

    async def get(self, user_id: uuid.UUID) -> User | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE id = %s", (user_id,))
            row = await cur.fetchone()
            return None if row is None else _user(row)

    async def credentials(self, email: str) -> Credentials | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_USER_COLUMNS}, password_hash FROM users WHERE lower(email) = lower(%s)",
                (email,),
            )
            row = await cur.fetchone()
            return None if row is None else Credentials(_user(row), row[5])

    async def set_password_hash(self, user_id: uuid.UUID, old_hash: str, new_hash: str) -> None:
        """Replace a hash (re-hash with new parameters, or reset), unless it changed meanwhile."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE users SET password_hash = %s, updated_at = now() "
                "WHERE id = %s AND password_hash = %s",
                (new_hash, user_id, old_hash),
            )

    async def update(
        self, user_id: uuid.UUID, *, role: Role | None = None, display_name: str | None = None
    ) -> User | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                f"""
                UPDATE users
                   SET role = coalesce(%s, role), display_name = coalesce(%s, display_name),
                       updated_at = now()
                 WHERE id = %s
                RETURNING {_USER_COLUMNS}
                """,
                (role.value if role else None, display_name, user_id),
            )
            row = await cur.fetchone()
            return None if row is None else _user(row)


@dataclass(frozen=True)
class RefreshOutcome:
    verdict: RefreshVerdict
    user_id: uuid.UUID | None = None
    role: Role | None = None


@dataclass(frozen=True)
class RevokeOutcome:
    found: bool
    owner: uuid.UUID | None = None


class SessionRepository:
    """Refresh-token families.

    Locking rule: every change to a family or its tokens happens while holding the family's row
    lock (``SELECT ... FOR UPDATE`` on ``refresh_families``), taken before any token row is read
    for a decision. Two refreshes with one token are serialized, the second one reads the token
    after the first committed (READ COMMITTED takes a new snapshot per statement) and sees it
    spent; and no two transactions lock rows of one family in different orders (no deadlock).
    """

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def start(self, user_id: uuid.UUID, token_hash: bytes, ttl: timedelta) -> None:
        """A new family (a login) with its first token."""
        family = uuid.uuid4()
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO refresh_families (id, user_id) VALUES (%s, %s)", (family, user_id)
            )
            await conn.execute(
                "INSERT INTO refresh_tokens (token_hash, family_id, issued_at, expires_at) "
                "VALUES (%s, %s, now(), now() + %s)",
                (token_hash, family, ttl),
            )

    async def rotate(self, token_hash: bytes, new_hash: bytes, ttl: timedelta) -> RefreshOutcome:
        """Spend ``token_hash`` and store ``new_hash`` in its family, in one transaction; or, if the
        token was already spent, revoke its whole family (committed before the caller answers)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """
                SELECT f.id, f.user_id, f.revoked_at, u.role
                  FROM refresh_families f JOIN users u ON u.id = f.user_id
                 WHERE f.id = (SELECT family_id FROM refresh_tokens WHERE token_hash = %s)
                   FOR UPDATE OF f
                """,
                (token_hash,),
            )
            fam = await cur.fetchone()
            if fam is None:
                return RefreshOutcome(RefreshVerdict.UNKNOWN)
            cur = await conn.execute(  # read after the lock: sees what a previous holder committed
                "SELECT expires_at, used_at, revoked_at, now() FROM refresh_tokens WHERE token_hash = %s",
                (token_hash,),
            )
            tok = await cur.fetchone()
            if tok is None:  # purged meanwhile
                return RefreshOutcome(RefreshVerdict.UNKNOWN)
            stored = StoredRefreshToken(
                family_id=fam[0],
                user_id=fam[1],
                user_role=Role(fam[3]),
                expires_at=tok[0],
                used_at=tok[1],
                revoked_at=tok[2],
                family_revoked_at=fam[2],
            )
            verdict = judge_refresh(stored, now=tok[3])
            if verdict is RefreshVerdict.REUSED:
                await self._revoke_family(conn, stored.family_id, "REUSE")
            elif verdict is RefreshVerdict.ROTATE:
                await conn.execute(
                    """
                    WITH spent AS (
                        UPDATE refresh_tokens SET used_at = now() WHERE token_hash = %s
                    )
                    INSERT INTO refresh_tokens (token_hash, family_id, issued_at, expires_at)
                    VALUES (%s, %s, now(), now() + %s)
                    """,
                    (token_hash, new_hash, stored.family_id, ttl),
                )
            return RefreshOutcome(verdict, stored.user_id, stored.user_role)

    async def revoke(self, token_hash: bytes, caller: uuid.UUID) -> RevokeOutcome:
        """Revoke the family of ``token_hash`` if it belongs to ``caller`` (idempotent)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """
                SELECT f.id, f.user_id FROM refresh_families f
                 WHERE f.id = (SELECT family_id FROM refresh_tokens WHERE token_hash = %s)
                   FOR UPDATE
                """,
                (token_hash,),
            )
            row = await cur.fetchone()
            if row is None:
                return RevokeOutcome(found=False)
            family, owner = row
            if owner == caller:
                await self._revoke_family(conn, family, "LOGOUT")
            return RevokeOutcome(found=True, owner=owner)

    async def revoke_all(self, user_id: uuid.UUID, reason: str) -> int:
        """Sign the account out everywhere: every family of its refresh tokens; how many."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE refresh_families SET revoked_at = now(), revoke_reason = %s "
                "WHERE user_id = %s AND revoked_at IS NULL RETURNING id", (reason, user_id))
            families = [row[0] for row in await cur.fetchall()]
            await conn.execute(
                "UPDATE refresh_tokens SET revoked_at = now() "
                "WHERE family_id = ANY(%s) AND revoked_at IS NULL", (families,))
        return len(families)

    @staticmethod
    async def _revoke_family(conn, family: uuid.UUID, reason: str) -> None:  # type: ignore[no-untyped-def]
        await conn.execute(
            "UPDATE refresh_families SET revoked_at = now(), revoke_reason = %s "
            "WHERE id = %s AND revoked_at IS NULL",
            (reason, family),
        )
        await conn.execute(
            "UPDATE refresh_tokens SET revoked_at = now() WHERE family_id = %s AND revoked_at IS NULL",
            (family,),
        )

    async def purge_expired(self, older_than: timedelta, limit: int = 1000) -> int:
        """Delete up to ``limit`` tokens expired for longer than ``older_than``, and the families
        they leave empty. Returns the number of tokens deleted."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """
                DELETE FROM refresh_tokens
                 WHERE token_hash IN (SELECT token_hash FROM refresh_tokens
                                       WHERE expires_at < now() - %s LIMIT %s)
                RETURNING family_id
                """,
                (older_than, limit),
            )
            rows = await cur.fetchall()
            count = len(rows)
            families = list({row[0] for row in rows})
            if families:
                await conn.execute(
                    """
                    DELETE FROM refresh_families f
                     WHERE f.id = ANY(%s)
                       AND NOT EXISTS (SELECT 1 FROM refresh_tokens t WHERE t.family_id = f.id)
                    """,
                    (families,),
                )
            return count
