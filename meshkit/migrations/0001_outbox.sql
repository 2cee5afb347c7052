-- Transactional outbox (meshkit.outbox): a service inserts a row in the same transaction as its
-- change; the relay publishes unpublished rows in id order and stamps published_at.
CREATE TABLE outbox (
    id           bigserial   PRIMARY KEY,
    event_id     uuid        NOT NULL UNIQUE,
    topic        text        NOT NULL,
    key          text        NOT NULL,             -- the aggregate id, sent as the record key
    payload      bytea       NOT NULL,             -- serialized ticketping.events.v1.EventEnvelope
    headers      jsonb       NOT NULL DEFAULT '{}', -- record headers: event_id, event_type, traceparent, source
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);

-- The relay's claim: unpublished rows in id order.
CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;
-- The relay's per-key ordering check: an earlier unpublished row of the same key.
CREATE INDEX outbox_unpublished_key_idx ON outbox (topic, key, id) WHERE published_at IS NULL;
-- Retention: published rows older than a day are deleted.
CREATE INDEX outbox_published_at_idx ON outbox (published_at) WHERE published_at IS NOT NULL;
