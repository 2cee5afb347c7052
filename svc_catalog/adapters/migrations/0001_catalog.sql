-- svc_catalog: events (performances) with their compact seat map and price tiers.
CREATE TABLE events (
    id                 uuid        PRIMARY KEY,
    -- Creation order, monotonically increasing and never reused: a stable key for listing every
    -- event (drafts included) in the order it was made, whatever its times.
    list_key           bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    -- CreateEventRequest.request_id: a retry with the same id finds the first event.
    request_id         uuid        UNIQUE,
    -- By name, never by ordinal.
    state              text        NOT NULL CHECK (state IN ('DRAFT', 'PUBLISHED')),
    title              text        NOT NULL,
    artist             text        NOT NULL DEFAULT '',
    venue_name         text        NOT NULL,
    venue_address      text        NOT NULL DEFAULT '',
    start_time         timestamptz NOT NULL,
    queue_open_time    timestamptz NOT NULL,
    sale_open_time     timestamptz NOT NULL,
    sale_close_time    timestamptz,
    seat_limit_per_fan integer     NOT NULL CHECK (seat_limit_per_fan > 0),
    -- [{"name": "VIP", "currency_code": "KRW", "units": 165000, "nanos": 0}, ...]
    price_tiers        jsonb       NOT NULL,
    -- {"sections": [{"name": "A", "rows": 10, "seats_per_row": 20, "tier": "VIP"}, ...]}
    seat_map           jsonb       NOT NULL,
    seat_count         integer     NOT NULL CHECK (seat_count BETWEEN 1 AND 50000),
    create_time        timestamptz NOT NULL,
    update_time        timestamptz NOT NULL,
    publish_time       timestamptz,
    CHECK (queue_open_time <= sale_open_time AND sale_open_time < start_time),
    CHECK ((state = 'PUBLISHED') = (publish_time IS NOT NULL))
);

-- The public list: published events by (start_time, id), read with keyset pagination.
CREATE INDEX events_published_start_idx ON events (start_time, id) WHERE state = 'PUBLISHED';
