"""Administrative commands of ``python -m svc_identity`` (same settings, same database).

    python -m svc_identity                       serve (the default)
    python -m svc_identity serve
    python -m svc_identity create-admin --email E --display-name N
        password from TP_ADMIN_PASSWORD, else prompted (twice) on a terminal; creates the account
        as ADMIN, or promotes an existing one (its password is left alone); idempotent
    python -m svc_identity ensure-user --email E --display-name N --role USER|ADMIN
        [--password-env VAR]  password from $VAR (default TP_USER_PASSWORD); creates the account
        or sets its role, display name and password; idempotent (make up's demo users)
    python -m svc_identity rotate-keys [--wait]
        next → current, current → retired, new next; refused (exit 3) while the next key has been
        published less than TP_KEY_PUBLISH_AHEAD_SECONDS, unless --wait (then it waits)

Exit codes: 0 done, 2 bad input or configuration, 3 rotation too early.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import sys
from collections.abc import Sequence

from meshkit.config import load
from meshkit.errors import DomainError
from meshkit.logging import setup_logging

from .config import Settings
from .domain.keys import RotationTooEarly
from .domain.users import Role, normalize_email

EXIT_BAD_INPUT = 2
EXIT_TOO_EARLY = 3


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m svc_identity", description="Ticketping identity service")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve gRPC (the default)")
    admin = sub.add_parser("create-admin", help="create the first admin, or promote an account to ADMIN")
    admin.add_argument("--email", required=True)
    admin.add_argument("--display-name", default="")
    admin.add_argument(
        "--promote", action="store_true",
        help="the email has an account already (anyone may have signed it up): make it ADMIN, with the "
             "password from TP_ADMIN_PASSWORD (or asked for) and every session of it signed out")
    ensure = sub.add_parser("ensure-user", help="create or update an account (idempotent)")
    ensure.add_argument("--email", required=True)
    ensure.add_argument("--display-name", default="")
    ensure.add_argument("--role", default="USER", choices=["USER", "ADMIN"])
    ensure.add_argument(
        "--password-env", default="TP_USER_PASSWORD", help="environment variable holding the password"
    )
    rotate = sub.add_parser("rotate-keys", help="rotate the signing keys of user tokens")
    rotate.add_argument("--wait", action="store_true", help="wait until the next key may sign")
    return p


def command_settings() -> Settings:
    """The service's settings; the commands need no Redis, so TP_REDIS_URL may be missing."""
    overrides: dict[str, object] = {}
    if not os.environ.get("TP_REDIS_URL"):
        overrides["redis_url"] = "redis://unused-by-commands"
    return load(Settings, **overrides)


def run(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    settings = command_settings()
    setup_logging(settings.service_name, "WARNING" if settings.log_level == "INFO" else settings.log_level,
                  settings.log_json)
    try:
        if args.command == "create-admin":
            return asyncio.run(create_admin(settings, args.email, args.display_name, promote=args.promote))
        if args.command == "ensure-user":
            password = os.environ.get(args.password_env)
            if not password:
                print(f"error: set the password in ${args.password_env}", file=sys.stderr)
                return EXIT_BAD_INPUT
            return asyncio.run(
                ensure_user(settings, args.email, args.display_name, Role(args.role), password)
            )
        if args.command == "rotate-keys":
            return asyncio.run(rotate_keys(settings, wait=args.wait))
    except DomainError as err:
        print(f"error: {err.reason}: {err.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    raise AssertionError(f"unknown command {args.command}")


async def _identity(stack: contextlib.AsyncExitStack, settings: Settings):  # type: ignore[no-untyped-def]
    from .bootstrap import open_identity

    return await open_identity(stack, settings, serving=False)


async def create_admin(settings: Settings, email: str, display_name: str, *, promote: bool = False) -> int:
    async with contextlib.AsyncExitStack() as stack:
        identity = await _identity(stack, settings)
        existing = await identity.users.credentials(normalize_email(email))
        if existing is not None and existing.user.role is Role.ADMIN:
            print(f"already an admin: {existing.user.email} ({existing.user.name})")
            return 0
        if existing is not None and not promote:
            # Sign-up needs no proof of the address: whoever registered it first holds its
            # password and sessions. Promoting it as it is would hand them the admin role.
            print(f"error: EXISTING_ACCOUNT: {existing.user.email} already has an account, which anyone "
                  "may have signed up; pass --promote to make it an admin with a new password "
                  "(TP_ADMIN_PASSWORD) and every session of it signed out", file=sys.stderr)
            return EXIT_BAD_INPUT
        password = os.environ.get("TP_ADMIN_PASSWORD") or _prompt_password()
        if password is None:
            print("error: set TP_ADMIN_PASSWORD (no terminal to ask on)", file=sys.stderr)
            return EXIT_BAD_INPUT
        user, outcome = await identity.ensure_user(email, display_name, Role.ADMIN, password)
        if existing is not None:
            await identity.sessions.revoke_all(user.id, "PROMOTED")
        word = {"created": "created admin", "updated": "promoted to admin",
                "unchanged": "already an admin"}[outcome.value]
        print(f"{word}: {user.email} ({user.name})")
        return 0


async def ensure_user(settings: Settings, email: str, display_name: str, role: Role, password: str) -> int:
    async with contextlib.AsyncExitStack() as stack:
        identity = await _identity(stack, settings)
        user, outcome = await identity.ensure_user(email, display_name, role, password)
        print(f"{outcome.value}: {user.email} role={user.role.value} ({user.name})")
        return 0


async def rotate_keys(settings: Settings, *, wait: bool) -> int:
    async with contextlib.AsyncExitStack() as stack:
        identity = await _identity(stack, settings)
        while True:
            try:
                result = await identity.keys.rotate()
            except RotationTooEarly as early:
                if not wait:
                    print(f"too early: {early}; retry later or pass --wait", file=sys.stderr)
                    return EXIT_TOO_EARLY
                print(f"waiting {early.wait.total_seconds():.0f}s: {early}", file=sys.stderr)
                await asyncio.sleep(early.wait.total_seconds() + 0.5)
                continue
            word = "rotated" if result.rotated else "created keys"
            print(f"{word}: current={result.current} next={result.next} retired={result.retired or '-'}")
            return 0


def _prompt_password() -> str | None:
    if not sys.stdin.isatty():
        return None
    first = getpass.getpass("password for the admin: ")
    if first != getpass.getpass("again: "):
        print("error: the passwords differ", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)
    return first
