"""Fixtures that start the real servers the tests need (test profile: own ports, own folder).

The infrastructure (Redis, PostgreSQL, Kafka) starts once per session on first use, the mesh
(five services and Envoy) on first use by an e2e test, and everything stops at the end of the
session: `TP_KEEP_STACK=1` keeps it running for a faster next run while developing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from devstack import stack
from devstack.layout import Layout, layout

from .support import fresh_database


@pytest.fixture(scope="session")
def lay() -> Layout:
    return layout("test")


@pytest.fixture(scope="session")
def infra(lay: Layout) -> Iterator[Layout]:
    try:
        stack.ensure_infra(lay)
    except BaseException:
        # What did start must not outlive a failed setup, unless the stack is meant to be kept:
        # then it may be another run's, still in use (a failed check is no reason to kill it).
        if not os.environ.get("TP_KEEP_STACK"):
            stack.down(lay)
        raise
    yield lay
    if not os.environ.get("TP_KEEP_STACK"):
        stack.down(lay)


@pytest.fixture(scope="session")
def mesh(infra: Layout) -> Layout:
    """The five services and the edge, running; torn down with the infra."""
    stack.start_services(infra)
    stack.start_edge(infra)
    return infra


@pytest.fixture(scope="session")
def edge_url(mesh: Layout) -> str:
    return mesh.edge_url


@pytest.fixture(scope="session")
def redis_url(infra: Layout) -> str:
    return infra.redis_url


@pytest.fixture(scope="session")
def kafka_bootstrap(infra: Layout) -> str:
    return infra.kafka_bootstrap


@pytest.fixture(scope="module")
def pg_dsn(infra: Layout) -> Iterator[str]:
    """A fresh, empty database for one test module, dropped afterwards."""
    with fresh_database(infra) as dsn:
        yield dsn


@pytest_asyncio.fixture(loop_scope="session")
async def unique_topic(kafka_bootstrap: str) -> AsyncIterator[str]:
    """A new topic (6 partitions) and its `.dlq`, deleted after the test."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic = f"test.{uuid.uuid4().hex[:10]}.v1"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 6, 1), NewTopic(f"{topic}.dlq", 1, 1)])
        yield topic
        await admin.delete_topics([topic, f"{topic}.dlq"])
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def redis_cluster_url(infra: Layout) -> str:
    """A three-master Redis Cluster (started on first use, not by `infra`), stopped with it."""
    return stack.ensure_redis_cluster(infra)
