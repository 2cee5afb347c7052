"""Who may call which RPC, read from the contracts' `(ticketping.access.v1.access)` option.

The edge enforces it first (jwt_authn rules and RBAC generated from the descriptor set); every
service enforces it again in meshkit's interceptor, from the identity the edge verified and put
into the `x-user-id` / `x-user-role` metadata (client-sent copies are stripped at the edge).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from ticketping.access.v1 import access_pb2

from .errors import PermissionDenied, Unauthenticated

Access = access_pb2.Access
PUBLIC, USER, ADMIN = access_pb2.ACCESS_PUBLIC, access_pb2.ACCESS_USER, access_pb2.ACCESS_ADMIN
ADMITTED, INTERNAL = access_pb2.ACCESS_ADMITTED, access_pb2.ACCESS_INTERNAL
PROVIDER = access_pb2.ACCESS_PROVIDER
# What a method without the option gets: fail closed.
DEFAULT = USER

# Headers only the edge may set, from verified tokens; client-sent copies are dropped at the edge.
# (x-admission-token itself is the client's admission token and passes.) The claims, in order:
# sub, event, jti, iat.
ADMISSION_CLAIM_HEADERS = ("x-admission-sub", "x-admission-event", "x-admission-jti", "x-admission-iat")
USER_ID_HEADER = "x-user-id"
USER_ROLE_HEADER = "x-user-role"
ROLE_ADMIN = "ADMIN"


def levels_of(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> dict[str, int]:
    """'/pkg.Service/Method' -> access level, for every RPC of Ticketping's packages."""
    out: dict[str, int] = {}
    for f in files:
        if not f.package.startswith("ticketping."):
            continue
        for svc in f.service:
            for m in svc.method:
                level = m.options.Extensions[access_pb2.access] or DEFAULT
                out[f"/{f.package}.{svc.name}/{m.name}"] = level
    return out


@cache
def level_of(full_method: str) -> int | None:
    """The access level of a served method ('/pkg.Service/Method'); None outside Ticketping."""
    _, service, method = full_method.split("/", 2)
    if not service.startswith("ticketping."):
        return None
    try:
        desc = descriptor_pool.Default().FindMethodByName(f"{service}.{method}")
    except KeyError:
        return DEFAULT
    return desc.GetOptions().Extensions[access_pb2.access] or DEFAULT


@dataclass(frozen=True)
class Caller:
    user_id: str | None
    role: str | None

    @property
    def is_admin(self) -> bool:
        return bool(self.user_id) and self.role == ROLE_ADMIN


def caller_of(metadata: Sequence[tuple[str, str | bytes]] | None) -> Caller:
    """Who calls, from the edge's metadata. A repeated header counts as absent (never guess)."""
    seen: dict[str, list[str]] = {}
    for key, value in metadata or ():
        if key in (USER_ID_HEADER, USER_ROLE_HEADER):
            seen.setdefault(key, []).append(value if isinstance(value, str) else value.decode())
    ids, roles = seen.get(USER_ID_HEADER, []), seen.get(USER_ROLE_HEADER, [])
    return Caller(ids[0] if len(ids) == 1 and ids[0] else None,
                  roles[0] if len(roles) == 1 and roles[0] else None)


def caller(context: grpc.aio.ServicerContext) -> Caller:
    return caller_of(context.invocation_metadata())


def single_value(context: grpc.aio.ServicerContext, key: str) -> str:
    """A metadata value present exactly once, else "" (a repeated header counts as absent)."""
    values = [v if isinstance(v, str) else v.decode()
              for k, v in (context.invocation_metadata() or ()) if k == key]
    return values[0] if len(values) == 1 else ""


def signed_in_user(context: grpc.aio.ServicerContext) -> str:
    """The caller's user id in a USER/ADMIN/ADMITTED method (the interceptor already required it)."""
    user = caller(context).user_id
    assert user is not None
    return user


def check(level: int | None, caller: Caller) -> None:
    """Raise the DomainError the caller gets when ``level`` does not admit them."""
    if level in (USER, ADMITTED, ADMIN) and caller.user_id is None:
        raise Unauthenticated("UNAUTHENTICATED", "sign in first (no verified user on the request)")
    if level == ADMIN and not caller.is_admin:
        raise PermissionDenied("ADMIN_ONLY", "only an ADMIN may do this",
                               metadata={"role": caller.role or ""})

# The user tokens identity signs and the edge verifies (defaults of both sides, one place).
USER_TOKEN_ISSUER = "ticketping-identity"
USER_TOKEN_AUDIENCE = "ticketping"

# The admission tokens the waiting room signs and the edge verifies on ADMITTED routes.
ADMISSION_TOKEN_ISSUER = "ticketping-queue"
ADMISSION_TOKEN_AUDIENCE = "ticketping-booking"
ADMISSION_TOKEN_HEADER = "x-admission-token"
