"""Identity's use cases: each one runs the domain rules against the adapters.

The servicer (server.py) turns requests into calls here and DomainErrors into statuses; the
commands (commands.py) call the same methods, so `create-admin` obeys the sign-up rules.
"""

from __future__ import annotations

import enum
import logging
import time
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from meshkit.errors import AlreadyExists, NotFound, PermissionDenied, Unauthenticated

from .adapters.keystore import KeyStore
from .adapters.passwords import Passwords
from .adapters.postgres import SessionRepository, UserRepository
from .adapters.queue_keys import QueueKeys
from .adapters.throttle import LoginThrottle
from .domain import tokens
from .domain.tokens import RefreshVerdict, TokenPair
from .domain.users import (
    ME,
    Caller,
    Role,
    User,
    check_password,
    normalize_display_name,
    normalize_email,
    parse_user_id,
    parse_user_name,
    require_caller,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenSettings:
    issuer: str
    audience: str
    access_ttl_seconds: int
    refresh_ttl_seconds: int
    password_max_length: int


class Ensured(enum.Enum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


def _invalid_credentials() -> Unauthenticated:
    return Unauthenticated("INVALID_CREDENTIALS", "the email or the password is wrong")


class IdentityService:
    def __init__(
        self,
        *,
        users: UserRepository,
        sessions: SessionRepository,
        keys: KeyStore,
        passwords: Passwords,
        throttle: LoginThrottle | None,
        queue_keys: QueueKeys | None,
        settings: TokenSettings,
    ) -> None:
        self.users = users
        self.sessions = sessions
        self.keys = keys
        self.passwords = passwords
        self.throttle = throttle
        self.queue_keys = queue_keys
        self.settings = settings

    # --- sign up ---

    async def sign_up(self, email: str, password: str, display_name: str, role: Role = Role.USER) -> User:
        email = normalize_email(email)
        check_password(password, max_length=self.settings.password_max_length)
        name = normalize_display_name(display_name, email)
        if await self.users.email_taken(email):  # cheap early answer; the unique index decides
            raise _email_taken()
        password_hash = await self.passwords.hash(password)
        user = await self.users.add(email, name, password_hash, role)
        if user is None:
            raise _email_taken()
        log.info("user signed up", extra={"user_id": str(user.id), "role": user.role.value})
        return user

    # --- sessions ---

    async def log_in(self, email: str, password: str, client: str) -> TokenPair:
        # As sign-up stores it (normalize_email): "José" typed with a combining accent is the
        # same address. Not the whole normalisation: a malformed address just matches nobody.
        email = unicodedata.normalize("NFC", email.strip())
        if not email or not password:
            raise _invalid_credentials()
        if self.throttle is not None:
            await self.throttle.begin(email, client)  # counted before the password is checked
        creds = None
        try:
            if len(password) <= self.settings.password_max_length:
                creds = await self.users.credentials(email)
                ok = await self.passwords.verify(creds.password_hash if creds else None, password)
            else:
                ok = False
        except BaseException:
            if self.throttle is not None:  # no outcome to count: give the attempt back
                await self.throttle.release(email, client)
            raise
        if not ok or creds is None:
            blocked = await self.throttle.failed(email, client) if self.throttle is not None else 0.0
            log.info(
                "login failed",
                extra={"client": client, "known_account": creds is not None, "blocked_seconds": blocked},
            )
            raise _invalid_credentials()
        if self.throttle is not None:
            await self.throttle.succeeded(email, client)
        if self.passwords.needs_rehash(creds.password_hash):
            new_hash = await self.passwords.hash(password)
            await self.users.set_password_hash(creds.user.id, creds.password_hash, new_hash)
        refresh = tokens.new_refresh_token()
        digest = tokens.refresh_token_hash(refresh)
        assert digest is not None
        await self.sessions.start(creds.user.id, digest, self._refresh_ttl)
        return await self._pair(creds.user.id, creds.user.role, refresh)

    async def refresh(self, refresh_token: str) -> TokenPair:
        tokens.require_refresh_token(refresh_token)
        digest = tokens.refresh_token_hash(refresh_token)
        if digest is None:
            raise tokens.refresh_error(RefreshVerdict.UNKNOWN)
        new = tokens.new_refresh_token()
        new_digest = tokens.refresh_token_hash(new)
        assert new_digest is not None
        outcome = await self.sessions.rotate(digest, new_digest, self._refresh_ttl)
        if outcome.verdict is not RefreshVerdict.ROTATE:
            if outcome.verdict is RefreshVerdict.REUSED:
                log.warning(
                    "refresh token reused: session family revoked",
                    extra={"user_id": str(outcome.user_id)},
                )
            raise tokens.refresh_error(outcome.verdict)
        assert outcome.user_id is not None and outcome.role is not None
        return await self._pair(outcome.user_id, outcome.role, new)

    async def revoke(self, refresh_token: str, caller: Caller | None) -> None:
        who = require_caller(caller)
        tokens.require_refresh_token(refresh_token)
        digest = tokens.refresh_token_hash(refresh_token)
        if digest is None:
            return  # not a token of ours: nothing to revoke
        outcome = await self.sessions.revoke(digest, who.user_id)
        if outcome.found and outcome.owner != who.user_id:
            raise PermissionDenied(
                "REFRESH_TOKEN_NOT_OWNED", "this refresh token belongs to another user"
            )

    @property
    def _refresh_ttl(self) -> timedelta:
        return timedelta(seconds=self.settings.refresh_ttl_seconds)

    async def _pair(self, user_id: uuid.UUID, role: Role, refresh: str) -> TokenPair:
        claims = tokens.access_claims(
            user_id=user_id,
            role=role,
            now=datetime.fromtimestamp(time.time(), UTC),
            ttl_seconds=self.settings.access_ttl_seconds,
            issuer=self.settings.issuer,
            audience=self.settings.audience,
        )
        access = await self.keys.sign(claims.as_dict())
        return TokenPair(access, refresh, self.settings.access_ttl_seconds, user_id)

    # --- users ---

    async def get_user(self, name: str, caller: Caller | None) -> User:
        who = require_caller(caller)
        target = parse_user_name(name)
        if target == ME or target == str(who.user_id):
            user_id: uuid.UUID | None = who.user_id
        else:
            if not who.is_admin:
                raise PermissionDenied("ADMIN_REQUIRED", "only an admin may read another user")
            user_id = parse_user_id(target)
        user = await self.users.get(user_id) if user_id is not None else None
        if user is None:
            raise NotFound("USER_NOT_FOUND", f"{name} does not exist")
        return user

    # --- keys ---

    async def signing_keys(self) -> list[dict[str, str]]:
        """Identity's keys only (the edge's user-token provider trusts exactly these)."""
        return await self.keys.jwks()

    async def public_jwks(self) -> list[dict[str, str]]:
        """Identity's keys plus the queue's admission-token keys (when the queue answers)."""
        own = await self.keys.jwks()
        extra = await self.queue_keys.keys() if self.queue_keys is not None else []
        seen = {k["kid"] for k in own}
        return own + [k for k in extra if k["kid"] not in seen]

    # --- administration (commands) ---

    async def ensure_user(
        self, email: str, display_name: str, role: Role, password: str | None
    ) -> tuple[User, Ensured]:
        """Make the account exist with this role (and this password, when one is given).

        Creating needs a password. For an existing account: the role and display name are set,
        the password is replaced only if one is given and it does not already match.
        """
        email = normalize_email(email)
        creds = await self.users.credentials(email)
        if creds is None:
            if password is None:
                raise NotFound("USER_NOT_FOUND", f"no account for {email}; a password is needed to create it")
            try:
                return await self.sign_up(email, password, display_name, role), Ensured.CREATED
            except AlreadyExists:  # created concurrently: fall through to the update
                creds = await self.users.credentials(email)
                assert creds is not None
        changed = False
        user = creds.user
        name = normalize_display_name(display_name, email) if display_name.strip() else user.display_name
        if user.role is not role or user.display_name != name:
            updated = await self.users.update(user.id, role=role, display_name=name)
            assert updated is not None
            user, changed = updated, True
        if password is not None and not await self.passwords.verify(creds.password_hash, password):
            check_password(password, max_length=self.settings.password_max_length)
            new_hash = await self.passwords.hash(password)
            await self.users.set_password_hash(user.id, creds.password_hash, new_hash)
            changed = True
        return user, Ensured.UPDATED if changed else Ensured.UNCHANGED


def _email_taken() -> AlreadyExists:
    return AlreadyExists("EMAIL_TAKEN", "an account with this email already exists")
