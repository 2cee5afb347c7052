"""CatalogService: translates proto ⇄ domain and domain errors ⇄ status codes.

Identity comes from the edge as metadata (`x-user-id`, `x-user-role`), after it verified the
user's JWT. Admin methods (ACCESS_ADMIN in the contract) are checked again by meshkit's
interceptor before they get here (defence in depth behind the edge's RBAC).

Public reads answer with `cache-control: public, max-age=N` (the edge's transcoder passes it on
as an HTTP header, so Envoy and apps may cache them); admin reads, drafts and writes answer
`cache-control: no-store`.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import OrderedDict
from typing import Any, TypeAlias

import grpc
from ticketping.catalog.v1 import catalog_service_pb2 as pb
from ticketping.catalog.v1 import catalog_service_pb2_grpc as pb_grpc

from meshkit import access

from .convert import populated_fields, spec_of, to_proto
from .domain import paging, rules
from .domain.model import Event
from .service import Catalog, Page

NO_STORE = "no-store"
_MEMO_LIMIT = 20_000
# Built list answers kept (most recently used): each holds copies of its events' protos, so only
# the pages fans actually page through (the first few), not one per made-up page token.
_PAGE_MEMO_LIMIT = 64
Ctx: TypeAlias = grpc.aio.ServicerContext


def _missing(field: str) -> rules.InvalidArgument:
    return rules.invalid("MISSING_FIELD", f"{field} is required", field)


class CatalogServicer(pb_grpc.CatalogServiceServicer):
    def __init__(self, catalog: Catalog, *, max_age_seconds: int = 5) -> None:
        self.catalog = catalog
        self.public_cache_control = f"public, max-age={max_age_seconds}"
        # The proto of each cached domain object, built once: (the object it was built from, proto).
        self._events: dict[uuid.UUID, tuple[Event, pb.Event]] = {}
        self._pages: OrderedDict[tuple[Any, int], tuple[Page, pb.ListEventsResponse]] = OrderedDict()

    # -- writes (ADMIN) ---------------------------------------------------------------------

    async def CreateEvent(self, request: pb.CreateEventRequest, context: Ctx) -> pb.Event:
        if not request.HasField("event"):
            raise _missing("event")
        event_id = rules.parse_event_id(request.event_id) if request.event_id else None
        request_id = rules.parse_request_id(request.request_id)
        asked = hashlib.sha256(request.event.SerializeToString(deterministic=True))
        asked.update(b"\0" + request.event_id.encode())
        event = await self.catalog.create(spec_of(request.event), event_id, request_id, asked.digest())
        await self._no_store(context)
        return to_proto(event)

    async def UpdateEvent(self, request: pb.UpdateEventRequest, context: Ctx) -> pb.Event:
        if not request.HasField("event"):
            raise _missing("event")
        event_id = rules.parse_event_name(request.event.name)
        paths = rules.update_paths(list(request.update_mask.paths), populated_fields(request.event))
        event = await self.catalog.update(event_id, spec_of(request.event), paths)
        await self._no_store(context)
        return to_proto(event)

    async def PublishEvent(self, request: pb.PublishEventRequest, context: Ctx) -> pb.Event:
        event = await self.catalog.publish(rules.parse_event_name(request.name))
        await self._no_store(context)
        return to_proto(event)

    # -- reads (public) ---------------------------------------------------------------------

    async def GetEvent(self, request: pb.GetEventRequest, context: Ctx) -> pb.Event:
        caller = access.caller(context)
        event = await self.catalog.get(rules.parse_event_name(request.name), include_drafts=caller.is_admin)
        public = event.is_published and not caller.is_admin
        await context.send_initial_metadata(
            (("cache-control", self.public_cache_control if public else NO_STORE),)
        )
        return self._render(event)

    async def ListEvents(
        self, request: pb.ListEventsRequest, context: Ctx
    ) -> pb.ListEventsResponse:
        caller = access.caller(context)
        size = paging.page_size(request.page_size)
        cursor = paging.decode(request.page_token)
        page = await self.catalog.list_page(cursor, size)
        key = (cursor, size)
        memo = self._pages.get(key)
        if memo is not None and memo[0] is page:
            response = memo[1]
            self._pages.move_to_end(key)
        else:
            response = pb.ListEventsResponse(
                events=[self._render(e) for e in page.events],
                next_page_token=paging.encode(page.next_cursor) if page.next_cursor else "",
            )
            self._pages[key] = (page, response)
            self._pages.move_to_end(key)
            while len(self._pages) > _PAGE_MEMO_LIMIT:
                self._pages.popitem(last=False)
        await context.send_initial_metadata(
            (("cache-control", NO_STORE if caller.is_admin else self.public_cache_control),)
        )
        return response

    # -- helpers ----------------------------------------------------------------------------

    def _render(self, event: Event) -> pb.Event:
        """The proto of a (cached, immutable) event, built once per cached instance."""
        memo = self._events.get(event.id)
        if memo is not None and memo[0] is event:
            return memo[1]
        msg = to_proto(event)
        if len(self._events) >= _MEMO_LIMIT:
            self._events.clear()
        self._events[event.id] = (event, msg)
        return msg

    @staticmethod
    async def _no_store(context: grpc.aio.ServicerContext) -> None:
        await context.send_initial_metadata((("cache-control", NO_STORE),))
