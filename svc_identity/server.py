"""IdentityService: translates proto ⇄ domain and domain errors ⇄ status codes.

Rules live in domain/, their orchestration in service.py; DomainErrors raised there become a
gRPC status with an ErrorInfo in meshkit's interceptor.
"""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2
from ticketping.identity.v1 import identity_service_pb2 as pb
from ticketping.identity.v1 import identity_service_pb2_grpc as pb_grpc

from meshkit import access

from .domain.throttle import client_address
from .domain.tokens import TOKEN_TYPE, TokenPair
from .domain.users import Caller, Role, User, caller_from_headers
from .service import IdentityService

_ROLES = {Role.USER: pb.ROLE_USER, Role.ADMIN: pb.ROLE_ADMIN}


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item.key == key:
            value = item.value
            return value.decode() if isinstance(value, bytes) else value
    return None


def _caller(context: grpc.aio.ServicerContext) -> Caller | None:
    # meshkit's reading of the edge's headers (a repeated header counts as absent), then ours.
    who = access.caller(context)
    return caller_from_headers(who.user_id, who.role)


def _client(context: grpc.aio.ServicerContext) -> str:
    return client_address(_metadata(context, "x-forwarded-for"), context.peer())


def _user(user: User) -> pb.User:
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(user.create_time)
    return pb.User(
        name=user.name,
        id=str(user.id),
        email=user.email,
        display_name=user.display_name,
        role=_ROLES[user.role],
        create_time=created,
    )


def _jwks(keys: list[dict[str, str]]) -> list[pb.JsonWebKey]:
    return [pb.JsonWebKey(**k) for k in keys]


class IdentityServicer(pb_grpc.IdentityServiceServicer):
    def __init__(self, identity: IdentityService) -> None:
        self.identity = identity

    async def CreateUser(self, request: pb.CreateUserRequest, context: grpc.aio.ServicerContext) -> pb.User:
        user = await self.identity.sign_up(request.email, request.password, request.display_name)
        return _user(user)

    async def GetUser(self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext) -> pb.User:
        return _user(await self.identity.get_user(request.name, _caller(context)))

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateSessionResponse:
        pair = await self.identity.log_in(request.email, request.password, _client(context))
        return pb.CreateSessionResponse(**_pair(pair))

    async def RefreshSession(
        self, request: pb.RefreshSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.RefreshSessionResponse:
        pair = await self.identity.refresh(request.refresh_token)
        return pb.RefreshSessionResponse(**_pair(pair))

    async def RevokeSession(
        self, request: pb.RevokeSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeSessionResponse:
        await self.identity.revoke(request.refresh_token, _caller(context))
        return pb.RevokeSessionResponse()

    async def GetJwks(
        self, request: pb.GetJwksRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetJwksResponse:
        # Short enough that a next key (published TP_KEY_PUBLISH_AHEAD_SECONDS ahead) is seen
        # by anyone caching this answer before it starts signing.
        await context.send_initial_metadata((("cache-control", "public, max-age=30"),))
        return pb.GetJwksResponse(keys=_jwks(await self.identity.public_jwks()))

    async def GetSigningKeys(
        self, request: pb.GetSigningKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSigningKeysResponse:
        await context.send_initial_metadata((("cache-control", "no-store"),))
        return pb.GetSigningKeysResponse(keys=_jwks(await self.identity.signing_keys()))


def _pair(pair: TokenPair) -> dict[str, object]:
    return {
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "expires_in": pair.expires_in,
        "token_type": TOKEN_TYPE,
        "user": f"users/{pair.user_id}",
    }
