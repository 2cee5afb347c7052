"""meshkit: what every Ticketping service needs, written once.

server bootstrap (server.py), settings (config.py), JSON logs (logging.py), errors (errors.py),
Prometheus metrics (metrics.py), OpenTelemetry tracing (tracing.py), PostgreSQL (db.py),
Redis (redis.py), and the Kafka outbox relay and consumer loop (outbox.py, consumer.py).
"""
