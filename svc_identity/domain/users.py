"""Users: roles, emails, passwords and display names. Plain rules, no I/O.

Emails are compared case-insensitively (the database enforces it with a unique index on
``lower(email)``); the address is kept as the user typed it, minus surrounding blanks, with its
domain lowercased and in Unicode NFC, so two spellings of one address cannot both sign up.
"""

from __future__ import annotations

import enum
import hashlib
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime

from meshkit.errors import InvalidArgument, Unauthenticated

MIN_PASSWORD_LENGTH = 10
MAX_EMAIL_LENGTH = 254  # RFC 5321 path limit
MAX_LOCAL_PART = 64
MAX_DISPLAY_NAME = 100

# RFC 5322 atext (the unquoted local part), besides letters and digits.
_ATEXT_SYMBOLS = set("!#$%&'*+/=?^_`{|}~-")


class Role(enum.Enum):
    """Stored by name (text) and carried by name in the ``role`` claim."""

    USER = "USER"
    ADMIN = "ADMIN"

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls(text.strip().upper())
        except ValueError:
            raise InvalidArgument("INVALID_ROLE", f"unknown role {text!r}: use USER or ADMIN") from None


@dataclass(frozen=True)
class User:
    id: uuid.UUID
    email: str
    display_name: str
    role: Role
    create_time: datetime

    @property
    def name(self) -> str:
        return f"users/{self.id}"


@dataclass(frozen=True)
class Credentials:
    """A user together with the stored hash of their password (never leaves the service)."""

    user: User
    password_hash: str


def normalize_email(raw: str) -> str:
    """The address to store, or InvalidArgument(INVALID_EMAIL).

    A practical subset of RFC 5321/5322/6531: one ``@``; an unquoted local part of letters
    (any script), digits and atext symbols with single inner dots; a domain of at least two
    dot-separated labels of letters, digits and inner hyphens, with a non-numeric last label.
    Quoted local parts, comments and IP-literal domains are refused.
    """
    email = unicodedata.normalize("NFC", raw.strip())
    if not email:
        raise InvalidArgument("INVALID_EMAIL", "an email is required")
    if len(email) > MAX_EMAIL_LENGTH:
        raise InvalidArgument("INVALID_EMAIL", f"the email is longer than {MAX_EMAIL_LENGTH} characters")
    local, at, domain = email.rpartition("@")
    if not at or not local or not domain:
        raise InvalidArgument("INVALID_EMAIL", "the email must look like name@example.com")
    if not _valid_local(local):
        raise InvalidArgument("INVALID_EMAIL", "the part of the email before @ is not valid")
    domain = domain.lower()
    if not _valid_domain(domain):
        raise InvalidArgument("INVALID_EMAIL", "the domain of the email is not valid")
    return f"{local}@{domain}"


def email_key(email: str) -> str:
    """The case-insensitive form of an address (for throttling keys; not the database's index)."""
    return unicodedata.normalize("NFC", email.strip()).casefold()


def email_fingerprint(email: str) -> str:
    """A short hash of :func:`email_key`, so Redis keys and logs carry no address."""
    return hashlib.sha256(email_key(email).encode()).hexdigest()[:32]


def _valid_local(local: str) -> bool:
    if len(local) > MAX_LOCAL_PART or local.startswith(".") or local.endswith(".") or ".." in local:
        return False
    return all(ch == "." or ch in _ATEXT_SYMBOLS or (ch.isalnum() and ch.isprintable()) for ch in local)


def _valid_domain(domain: str) -> bool:
    if len(domain) > 253 or domain.endswith("."):
        return False
    labels = domain.split(".")
    if len(labels) < 2:
        return False
    for label in labels:
        if not 1 <= len(label) <= 63 or label.startswith("-") or label.endswith("-"):
            return False
        if not all(ch == "-" or (ch.isalnum() and ch.isprintable()) for ch in label):
            return False
    return not labels[-1].isdigit()


def check_password(password: str, *, max_length: int) -> None:
    """The password policy for new passwords: at least 10 characters (code points)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidArgument(
            "PASSWORD_TOO_SHORT",
            f"the password must have at least {MIN_PASSWORD_LENGTH} characters",
            metadata={"min_length": str(MIN_PASSWORD_LENGTH)},
        )
    if len(password) > max_length:
        raise InvalidArgument(
            "PASSWORD_TOO_LONG",
            f"the password must have at most {max_length} characters",
            metadata={"max_length": str(max_length)},
        )


def normalize_display_name(raw: str, email: str) -> str:
    """Trimmed, printable, at most 100 characters; empty means the email's local part."""
    name = unicodedata.normalize("NFC", raw.strip())
    if not name:
        name = email.rpartition("@")[0][:MAX_DISPLAY_NAME]
    if len(name) > MAX_DISPLAY_NAME:
        raise InvalidArgument(
            "INVALID_DISPLAY_NAME", f"the display name must have at most {MAX_DISPLAY_NAME} characters"
        )
    if not all(ch.isprintable() for ch in name):
        raise InvalidArgument("INVALID_DISPLAY_NAME", "the display name has control characters")
    return name


ME = "me"


def parse_user_name(name: str) -> str:
    """``users/me`` → "me"; ``users/<id>`` → "<id>" (not checked yet). Malformed: INVALID_ARGUMENT."""
    prefix, slash, rest = name.partition("/")
    if prefix != "users" or not slash or not rest or "/" in rest:
        raise InvalidArgument("INVALID_NAME", "name must be users/me or users/{user}")
    return rest


def parse_user_id(text: str) -> uuid.UUID | None:
    """A user id, or None when ``text`` cannot be one (so no such user exists)."""
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class Caller:
    """Who calls, as the edge verified it (metadata ``x-user-id`` / ``x-user-role``)."""

    user_id: uuid.UUID
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


def caller_from_headers(user_id: str | None, role: str | None) -> Caller | None:
    """None when there is no ``x-user-id``; an unusable one is UNAUTHENTICATED. An unknown or
    missing role counts as USER (least privilege)."""
    if user_id is None or not user_id.strip():
        return None
    uid = parse_user_id(user_id.strip())
    if uid is None:
        raise Unauthenticated("INVALID_IDENTITY", "the caller's identity is not a user id")
    try:
        parsed = Role((role or "").strip().upper())
    except ValueError:
        parsed = Role.USER
    return Caller(uid, parsed)


def require_caller(caller: Caller | None) -> Caller:
    if caller is None:
        raise Unauthenticated("UNAUTHENTICATED", "this method needs a user token")
    return caller
