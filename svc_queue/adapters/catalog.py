"""Asking catalog whether an event is published (CatalogService.GetEvent, a public method).

Used only when a room is missing from Redis (svc_queue/recovery.py): catalog's answer is turned
into the EventPublished message catalog would have sent, so the room is rebuilt by the same code
that handles the Kafka event.
"""

from __future__ import annotations

import grpc
from ticketping.catalog.v1 import catalog_service_pb2 as cpb
from ticketping.catalog.v1 import catalog_service_pb2_grpc as cpb_grpc
from ticketping.events.v1 import events_pb2 as ev

from meshkit.channels import client_channel


class CatalogUnreachable(Exception):
    """Catalog did not answer (down, overloaded, too slow): nothing is known about the event."""


def event_published(event: cpb.Event) -> ev.EventPublished:
    """The EventPublished catalog sends for ``event`` (svc_catalog/adapters/messages.py)."""
    return ev.EventPublished(
        event=event.name,
        title=event.title,
        start_time=event.start_time,
        queue_open_time=event.queue_open_time,
        sale_open_time=event.sale_open_time,
        seat_limit_per_fan=event.seat_limit_per_fan,
        price_tiers=[ev.PriceTier(name=t.name, price=t.price) for t in event.price_tiers],
        seat_ranges=[
            ev.SeatRange(section=s.name, rows=s.rows, seats_per_row=s.seats_per_row, tier=s.tier)
            for s in event.seat_map.sections
        ],
        seat_count=event.seat_count,
    )


class CatalogClient:
    """GetEvent over gRPC with a short deadline; no caller metadata (the method is public, and
    as a non-admin caller catalog never shows a draft)."""

    # Answers that say nothing about the event: catalog is down, restarting or too slow.
    _UNREACHABLE = frozenset({
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED,
    })

    def __init__(self, address: str, *, timeout: float = 1.0) -> None:
        self._channel = client_channel(address)
        self._stub = cpb_grpc.CatalogServiceStub(self._channel)
        self.timeout = timeout

    async def published(self, event_id: str) -> ev.EventPublished | None:
        """The event's EventPublished if it exists and is published, else None.
        Raises CatalogUnreachable when catalog gives no answer about it."""
        try:
            event = await self._stub.GetEvent(
                cpb.GetEventRequest(name=f"events/{event_id}"), timeout=self.timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() in self._UNREACHABLE:
                raise CatalogUnreachable(err.code().name) from None
            return None  # NOT_FOUND, INVALID_ARGUMENT, PERMISSION_DENIED, ...: no such event
        if event.state != cpb.EVENT_STATE_PUBLISHED:
            return None
        return event_published(event)

    async def close(self) -> None:
        await self._channel.close()
