-- The built-in sandbox PSP's own state (adapters/provider.py). A real PSP keeps this on its side,
-- outside the merchant's process; the sandbox keeps it here so a crash of svc_payment loses no
-- callback. Payment's own logic never reads these tables: it only talks to the provider.

-- One checkout per payment, written before create_checkout returns. The callback still to send
-- is the row's due_at; a sender claims a due row by moving due_at one lease ahead (a visibility
-- timeout), so if it dies mid-send the row becomes due again and another replica re-sends it.
CREATE TABLE sandbox_checkouts (
    reference     text        PRIMARY KEY,        -- sbx_<payment id hex>
    payment_id    uuid        NOT NULL,
    order_name    text        NOT NULL,           -- "orders/<id>"
    currency_code text        NOT NULL,
    units         bigint      NOT NULL,
    nanos         integer     NOT NULL,
    outcome       text        NOT NULL CHECK (outcome IN ('approve', 'decline', 'never')),
    event_id      text        NOT NULL UNIQUE,    -- the callback's id: the same on every re-send
    created_at    timestamptz NOT NULL DEFAULT now(),
    due_at        timestamptz,                    -- next send (or lease end); NULL: nothing to send
    claim         uuid,                           -- the sender's claim while due_at is its lease
    attempts      integer     NOT NULL DEFAULT 0, -- sends started
    delivered_at  timestamptz,                    -- a 2xx was received
    given_up_at   timestamptz,                    -- the attempts ran out without a 2xx
    last_error    text        NOT NULL DEFAULT '',
    cancelled_at  timestamptz,                    -- recorded only: a late callback still comes
    CHECK (outcome <> 'never' OR due_at IS NULL)
);

CREATE INDEX sandbox_checkouts_due_idx ON sandbox_checkouts (due_at) WHERE due_at IS NOT NULL;

-- Refunds, idempotent on the caller's key: asked again (after a crash, by another replica), the
-- first refund is answered, no money moves twice.
CREATE TABLE sandbox_refunds (
    idempotency_key text        PRIMARY KEY,
    refund_id       text        NOT NULL UNIQUE,
    reference       text        NOT NULL,
    currency_code   text        NOT NULL,
    units           bigint      NOT NULL,
    nanos           integer     NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX sandbox_refunds_reference_idx ON sandbox_refunds (reference);
