"""meshkit: what every Ticketping service needs, written once.

server bootstrap (server.py), settings (config.py), JSON logs (logging.py), errors (errors.py),
Prometheus metrics (metrics.py), OpenTelemetry tracing (tracing.py), PostgreSQL (db.py),
Redis (redis.py), and the Kafka outbox relay and consumer loop (outbox.py, consumer.py).
"""

import os

# grpcio reads GRPC_EXPERIMENTS once, when its core loads, so this runs before anything imports
# grpc: every service's `python -m svc_*` imports meshkit first. grpcio 1.85's EventEngine
# listener and client cost a grpc.aio server about 35 us more CPU per unary call (226-232 against
# 188-207 us, 20,000 calls each) and its client about 33 us more (177-183 against 145-147) than
# the iomgr paths they replaced, and a purchase makes about fifteen such calls. A deployment that
# sets the variable itself keeps its own.
GRPC_EXPERIMENTS = "-event_engine_listener,-event_engine_client"
os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
