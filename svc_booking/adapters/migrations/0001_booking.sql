-- Booking's truth: the inventory built from EventPublished, holds, orders and sold seats.
-- Redis holds the live state ({inv:<event>}); everything needed to rebuild it is here.

-- One row per published event (inserted once: EventPublished again changes nothing).
CREATE TABLE events (
    event_id           text        PRIMARY KEY,          -- the catalog id ("events/<id>" without the prefix)
    title              text        NOT NULL DEFAULT '',
    seat_limit_per_fan integer     NOT NULL,
    currency_code      text        NOT NULL,
    seat_count         integer     NOT NULL,
    seat_ranges        jsonb       NOT NULL,             -- [{section, rows, seats_per_row, tier}]
    price_tiers        jsonb       NOT NULL,             -- [{name, currency_code, units, nanos}]
    created_at         timestamptz NOT NULL DEFAULT now()
);

-- Every seat of every event, with its tier and price (expanded from the ranges).
CREATE TABLE seats (
    event_id    text    NOT NULL REFERENCES events (event_id),
    seat_id     text    NOT NULL,
    section     text    NOT NULL,
    "row"       integer NOT NULL,
    number      integer NOT NULL,
    tier        text    NOT NULL,
    price_units bigint  NOT NULL,
    price_nanos integer NOT NULL,
    PRIMARY KEY (event_id, seat_id)
);

-- A hold: ACTIVE -> ORDERED (an order was made from it) -> SOLD, or -> RELEASED / EXPIRED /
-- CANCELLED. States are stored by name.
CREATE TABLE holds (
    hold_id      uuid        PRIMARY KEY,
    event_id     text        NOT NULL REFERENCES events (event_id),
    user_id      text        NOT NULL,
    seat_ids     text[]      NOT NULL,
    request_id   uuid        NOT NULL,
    state        text        NOT NULL CHECK (state IN ('ACTIVE', 'ORDERED', 'SOLD', 'RELEASED', 'EXPIRED', 'CANCELLED')),
    expire_time  timestamptz NOT NULL,
    create_time  timestamptz NOT NULL,
    update_time  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, user_id, request_id)
);
-- Rebuilding an event's live state reads its live holds.
CREATE INDEX holds_live_idx ON holds (event_id) WHERE state IN ('ACTIVE', 'ORDERED');

CREATE TABLE orders (
    order_id      uuid        PRIMARY KEY,
    event_id      text        NOT NULL REFERENCES events (event_id),
    hold_id       uuid        NOT NULL UNIQUE REFERENCES holds (hold_id),
    user_id       text        NOT NULL,
    seat_ids      text[]      NOT NULL,
    currency_code text        NOT NULL,
    amount_units  bigint      NOT NULL,
    amount_nanos  integer     NOT NULL,
    state         text        NOT NULL CHECK (state IN ('PENDING_PAYMENT', 'CONFIRMED', 'CANCELLED', 'EXPIRED')),
    expire_time   timestamptz NOT NULL,
    payment       text        NOT NULL DEFAULT '',
    request_id    uuid        NOT NULL,
    create_time   timestamptz NOT NULL DEFAULT now(),
    update_time   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, request_id)
);
CREATE INDEX orders_user_idx ON orders (user_id, create_time DESC, order_id DESC);

-- The seats that are sold. The primary key makes a double sale impossible, whatever Redis says.
CREATE TABLE sold_seats (
    event_id text        NOT NULL REFERENCES events (event_id),
    seat_id  text        NOT NULL,
    order_id uuid        NOT NULL REFERENCES orders (order_id),
    sold_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, seat_id)
);
