"""Load the demo event, so a newcomer running `make up` has something to look at.

    python -m svc_catalog.demo [--grpc 127.0.0.1:7062]

Creates and publishes "Ticketping Demo Night" (3,200 seats in sections A/B/C, tiers VIP/R/S in
KRW; the waiting room opens now, the sale two minutes later, the show in 30 days) by calling
CatalogService as an ADMIN (the metadata the edge would set), and prints the event's name.
Idempotent: a fixed request id makes every run answer with the same event, published once.
devstack can call :func:`load_demo` directly.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from google.type.money_pb2 import Money
from ticketping.catalog.v1 import catalog_service_pb2 as pb
from ticketping.catalog.v1 import catalog_service_pb2_grpc as pb_grpc

from meshkit.errors import error_info

DEMO_REQUEST_ID = "5e1c4a3b-7d2f-4c1e-9a6b-2f0d8e7c6b5a"
ADMIN_METADATA = (("x-user-id", "demo-admin"), ("x-user-role", "ADMIN"))
DEFAULT_TARGET = os.environ.get("TP_CATALOG_GRPC", "127.0.0.1:7062")  # devstack's dev profile
SALE_DELAY = timedelta(minutes=2)
SHOW_DELAY = timedelta(days=30)


def _ts(t: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(t.replace(microsecond=0))
    return ts


def demo_times(now: datetime) -> dict[str, Timestamp]:
    return {
        "queue_open_time": _ts(now),
        "sale_open_time": _ts(now + SALE_DELAY),
        "start_time": _ts((now + SHOW_DELAY).replace(hour=10, minute=0, second=0)),  # 19:00 KST
    }


def demo_event(now: datetime) -> pb.Event:
    def krw(units: int) -> Money:
        return Money(currency_code="KRW", units=units)

    return pb.Event(
        title="Ticketping Demo Night - Seoul",
        artist="The Placeholders",
        venue=pb.Venue(name="KSPO Dome", address="424 Olympic-ro, Songpa-gu, Seoul"),
        seat_limit_per_fan=4,
        price_tiers=[
            pb.PriceTier(name="VIP", price=krw(165_000)),
            pb.PriceTier(name="R", price=krw(132_000)),
            pb.PriceTier(name="S", price=krw(99_000)),
        ],
        seat_map=pb.SeatMap(
            sections=[
                pb.SeatSection(name="A", rows=10, seats_per_row=20, tier="VIP"),  # 200
                pb.SeatSection(name="B", rows=20, seats_per_row=30, tier="R"),  # 600
                pb.SeatSection(name="C", rows=40, seats_per_row=60, tier="S"),  # 2,400
            ]
        ),
        **demo_times(now),
    )


async def load_demo(target: str = DEFAULT_TARGET, *, ready_within: float = 30.0) -> pb.Event:
    """Create (once) and publish the demo event through CatalogService at ``target``."""
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), ready_within)
        stub = pb_grpc.CatalogServiceStub(channel)
        now = datetime.now(UTC)
        try:
            event = await stub.CreateEvent(
                pb.CreateEventRequest(event=demo_event(now), request_id=DEMO_REQUEST_ID),
                metadata=ADMIN_METADATA,
                timeout=10,
            )
        except grpc.aio.AioRpcError as err:
            # Made by an earlier run, whose times (relative to its own now) differ from this
            # run's: the same request id with another request names the event it made.
            info = error_info(err)
            if info is None or info.reason != "REQUEST_ID_REUSED":
                raise
            event = await stub.GetEvent(pb.GetEventRequest(name=info.metadata["used_for"]),
                                        metadata=ADMIN_METADATA, timeout=10)
        if event.state == pb.EVENT_STATE_PUBLISHED:
            return event
        try:
            return await stub.PublishEvent(
                pb.PublishEventRequest(name=event.name), metadata=ADMIN_METADATA, timeout=10
            )
        except grpc.aio.AioRpcError as err:
            info = error_info(err)
            if info is None or info.reason != "INVALID_TIMES":
                raise
        # A draft left by an earlier run whose sale time has passed meanwhile: move the times.
        moved = pb.Event(name=event.name, **demo_times(datetime.now(UTC)))
        await stub.UpdateEvent(
            pb.UpdateEventRequest(
                event=moved,
                update_mask=FieldMask(paths=["queue_open_time", "sale_open_time", "start_time"]),
            ),
            metadata=ADMIN_METADATA,
            timeout=10,
        )
        return await stub.PublishEvent(
            pb.PublishEventRequest(name=event.name), metadata=ADMIN_METADATA, timeout=10
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m svc_catalog.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--grpc", default=DEFAULT_TARGET, help="CatalogService address (host:port)")
    args = parser.parse_args(argv)
    try:
        event = asyncio.run(load_demo(args.grpc))
    except (TimeoutError, grpc.aio.AioRpcError) as err:
        detail = err.details() if isinstance(err, grpc.aio.AioRpcError) else "not reachable"
        print(f"demo: could not load the demo event via {args.grpc}: {detail}", file=sys.stderr)
        return 1
    print(event.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
