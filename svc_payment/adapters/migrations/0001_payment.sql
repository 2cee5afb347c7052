-- Payments: one attempt to pay one order. PENDING -> SUCCEEDED (-> REFUNDED) or -> FAILED / CANCELLED.
CREATE TABLE payments (
    payment_id         uuid        PRIMARY KEY,      -- uuid5(user, request id): retries get the same id
    order_id           uuid        NOT NULL,
    hold               text        NOT NULL DEFAULT '', -- "events/<e>/holds/<h>" of the order (HoldExpired)
    user_id            text        NOT NULL,
    request_id         uuid        NOT NULL,
    state              text        NOT NULL
        CHECK (state IN ('PENDING', 'SUCCEEDED', 'FAILED', 'REFUNDED', 'CANCELLED')),
    currency_code      text        NOT NULL,
    units              bigint      NOT NULL,
    nanos              integer     NOT NULL,
    provider           text        NOT NULL,
    provider_reference text        NOT NULL UNIQUE,
    failure_reason     text        NOT NULL DEFAULT '',
    refund_reference   text        NOT NULL DEFAULT '',
    create_time        timestamptz NOT NULL,
    update_time        timestamptz NOT NULL,
    UNIQUE (user_id, request_id)
);

-- At most one payment per order can still take (or has taken) the money: a second attempt while
-- one is PENDING gets the first, and a paid order cannot be paid again.
CREATE UNIQUE INDEX payments_one_live_per_order ON payments (order_id)
    WHERE state IN ('PENDING', 'SUCCEEDED');
CREATE INDEX payments_order_idx ON payments (order_id);
CREATE INDEX payments_hold_idx ON payments (hold) WHERE hold <> '';

-- Every provider callback processed, by the provider's event id: a replay changes nothing.
CREATE TABLE provider_events (
    provider     text        NOT NULL,
    event_id     text        NOT NULL,
    payment_id   uuid        NOT NULL REFERENCES payments (payment_id),
    type         text        NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_id)
);
