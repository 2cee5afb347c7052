-- Signed success callbacks whose reference no payment had when they came. Usually the callback
-- raced its payment's insert (the checkout is opened first) and a re-send finds the payment; the
-- row is then dropped. One that is still unmatched after TP_UNMATCHED_REFUND_SECONDS is money
-- captured for no payment (the process died between opening the checkout and writing the
-- payment, and the app never retried): it is refunded, once.
CREATE TABLE unmatched_callbacks (
    provider         text        NOT NULL,
    reference        text        NOT NULL,
    event_id         text        NOT NULL,       -- the first callback's id
    currency_code    text        NOT NULL,       -- what the callback says was captured
    units            bigint      NOT NULL,
    nanos            integer     NOT NULL,
    first_seen       timestamptz NOT NULL DEFAULT now(),
    refund_reference text        NOT NULL DEFAULT '',
    refunded_at      timestamptz,
    PRIMARY KEY (provider, reference)
);

CREATE INDEX unmatched_callbacks_due_idx ON unmatched_callbacks (first_seen) WHERE refunded_at IS NULL;
