"""Event envelopes: build one around a payload, read the payload back, derive record headers.

Every Kafka record value on a ``ticketping.<domain>.v1`` topic is a serialized
``ticketping.events.v1.EventEnvelope``; its key is the envelope's ``aggregate_id``. The payload is
one field of the envelope's ``payload`` oneof, found here from the payload's message type (read from
the descriptor, so a new event type needs no change in this module).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from google.protobuf.message import Message
from opentelemetry import propagate
from ticketping.events.v1.events_pb2 import EventEnvelope, EventPublished

PAYLOAD_ONEOF = "payload"

# Kafka record header names written by the outbox relay (values are UTF-8 bytes).
HEADER_EVENT_ID = "event_id"
HEADER_EVENT_TYPE = "event_type"
HEADER_TRACEPARENT = "traceparent"
HEADER_SOURCE = "source"

# payload message full name (e.g. "ticketping.events.v1.Ping") -> oneof field name ("ping")
_FIELD_BY_TYPE: dict[str, str] = {
    field.message_type.full_name: field.name
    for field in EventEnvelope.DESCRIPTOR.oneofs_by_name[PAYLOAD_ONEOF].fields
    if field.message_type is not None
}


class EnvelopeError(ValueError):
    """An envelope (or a payload for one) is not valid."""


def payload_field_for(payload_message: Message) -> str:
    """The name of the envelope's oneof field that carries ``payload_message``'s type."""
    full_name = payload_message.DESCRIPTOR.full_name
    try:
        return _FIELD_BY_TYPE[full_name]
    except KeyError:
        raise EnvelopeError(
            f"{full_name} is not a payload of {EventEnvelope.DESCRIPTOR.full_name}; "
            f"known payloads: {', '.join(sorted(_FIELD_BY_TYPE))}"
        ) from None


def new_envelope(source: str, aggregate_id: str, payload_message: Message) -> EventEnvelope:
    """Wrap ``payload_message`` in a new envelope: fresh UUID, now, the current trace context."""
    if not aggregate_id:
        raise EnvelopeError("aggregate_id must not be empty: it is the record key")
    field = payload_field_for(payload_message)
    env = EventEnvelope(
        event_id=str(uuid.uuid4()),
        aggregate_id=aggregate_id,
        source=source,
        traceparent=current_traceparent(),
    )
    env.occurred_at.FromDatetime(datetime.now(UTC))
    target = getattr(env, field)
    target.SetInParent()  # an all-default payload must still select its oneof field
    target.CopyFrom(payload_message)
    return env


def sales_end_ms(msg: EventPublished) -> int:
    """When an event stops selling (ms): its sale_close_time if it has one, else its show's start
    (catalog keeps the close no later than the start)."""
    start = msg.start_time.ToMilliseconds()
    if msg.HasField("sale_close_time"):
        return min(start, msg.sale_close_time.ToMilliseconds())
    return start


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the current OpenTelemetry context, or "" when there is none."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get(HEADER_TRACEPARENT, "")


def event_type(envelope: EventEnvelope) -> str:
    """The name of the set payload field (e.g. ``payment_succeeded``), or "" if none is set."""
    return envelope.WhichOneof(PAYLOAD_ONEOF) or ""


def payload_of(envelope: EventEnvelope) -> Message:
    """The payload message carried by ``envelope``; EnvelopeError if none is set.

    An envelope written by a newer producer with a payload type this build does not know parses
    with no payload set: callers that want to skip such events check :func:`event_type` first.
    """
    field = envelope.WhichOneof(PAYLOAD_ONEOF)
    if field is None:
        raise EnvelopeError(f"envelope {envelope.event_id or '?'} carries no (known) payload")
    payload: Message = getattr(envelope, field)
    return payload


def validate(envelope: EventEnvelope) -> uuid.UUID:
    """Check what the plumbing relies on (a UUID event id, an aggregate id); return the UUID."""
    try:
        event_id = uuid.UUID(envelope.event_id)
    except ValueError:
        raise EnvelopeError(f"event_id {envelope.event_id!r} is not a UUID") from None
    if not envelope.aggregate_id:
        raise EnvelopeError(f"envelope {envelope.event_id} has no aggregate_id")
    return event_id


def parse(value: bytes | None) -> EventEnvelope:
    """Parse and validate a record value; EnvelopeError if it is not a usable envelope."""
    if not value:
        raise EnvelopeError("empty record value")
    env = EventEnvelope()
    try:
        env.ParseFromString(value)
    except Exception as exc:  # DecodeError, or anything the runtime raises on garbage
        raise EnvelopeError(f"not an EventEnvelope: {exc}") from None
    validate(env)
    return env


def headers_for(envelope: EventEnvelope) -> dict[str, str]:
    """The record headers the relay sends with ``envelope`` (empty values left out)."""
    headers = {
        HEADER_EVENT_ID: envelope.event_id,
        HEADER_EVENT_TYPE: event_type(envelope),
        HEADER_SOURCE: envelope.source,
        HEADER_TRACEPARENT: envelope.traceparent,
    }
    return {k: v for k, v in headers.items() if v}
