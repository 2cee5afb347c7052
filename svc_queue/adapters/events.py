"""Kafka → the waiting rooms, without a database.

meshkit's :class:`~meshkit.consumer.EventConsumer` gives the loop (offsets committed only after a
record's effect, retries with backoff, then the DLQ; rebalances; graceful stop). Its
de-duplication is a ``processed_events`` row written in the handler's PostgreSQL transaction; the
queue keeps everything in Redis and has no PostgreSQL, so here each effect de-duplicates itself,
atomically, in the same Redis script that applies it:

* ``EventPublished`` → the room's config hash: the event's facts are written (a published event
  never changes), its settings only where absent, and the event is added to the room registry.
  Applying it twice is the same as once, and a redelivery never undoes an admin's change.
* ``OrderConfirmed`` / ``OrderCancelled`` → EndSession with the envelope's ``event_id`` as a marker
  key under the room's hash tag, set in the same script that ends the session: a redelivery
  (even after the fan was admitted again) changes nothing.

Redis being unreachable is not the record's fault: such errors are retried until Redis answers
(or the consumer stops) and never park a record on the DLQ.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka.structs import ConsumerRecord
from redis import exceptions as redis_errors

from meshkit.consumer import EventConsumer, Outcome
from meshkit.events import EventEnvelope

log = logging.getLogger(__name__)

# Returns True when the event had been applied before (a duplicate).
RedisHandler = Callable[[EventEnvelope], Awaitable[bool]]

_UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.MasterDownError,
)


def is_redis_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, _UNAVAILABLE)


async def _no_sql(envelope: EventEnvelope, conn: Any) -> None:  # never called
    raise AssertionError("the queue's consumer has no PostgreSQL transaction")


class RedisEventConsumer(EventConsumer):
    """EventConsumer whose handler applies and de-duplicates each event in Redis itself."""

    def __init__(
        self, bootstrap_servers: str, group_id: str, topics: Iterable[str], handler: RedisHandler,
        **options: Any,
    ) -> None:
        options.setdefault("is_transient", is_redis_unavailable)
        super().__init__(None, bootstrap_servers, group_id, topics, _no_sql, **options)  # type: ignore[arg-type]
        self._redis_handler = handler

    async def _process_once(self, rec: ConsumerRecord[Any, Any], env: EventEnvelope) -> Outcome:
        with self.span(rec, env):
            return "duplicate" if await self._redis_handler(env) else "processed"
