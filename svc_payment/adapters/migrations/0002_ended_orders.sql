-- Orders booking told us are over (OrderExpired / OrderCancelled), so a payment started while the
-- order was ending is refused instead of staying PENDING forever. CreatePayment's insert and the
-- consumer's handling of the event take the same per-order advisory lock: whichever commits first,
-- the other sees it.
CREATE TABLE ended_orders (
    order_id   uuid        PRIMARY KEY,
    state      text        NOT NULL,          -- EXPIRED or CANCELLED
    ended_at   timestamptz NOT NULL DEFAULT now()
);
