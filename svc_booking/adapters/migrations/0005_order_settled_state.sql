-- order_settled says what the order became, not only which order: "<order id> <state>
-- <update_time in microseconds since 1970> <payment>" (the payment empty unless CONFIRMED).
-- A waiting WaitOrder answers from it instead of reading the order again: one read fewer in
-- every purchase. Leaving PENDING_PAYMENT changes only these three columns, so the order a
-- waiter read before, with them, is the order as committed.
--
-- A replica older than this migration cannot parse the new payload and ignores it: during a
-- rolling update its waiting calls answer at their next look (SETTLED_RECHECK_SECONDS), not at
-- once. Newer replicas take the bare order id too (and read the order then).
CREATE OR REPLACE FUNCTION order_settled_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('order_settled', concat_ws(' ', NEW.order_id::text, NEW.state,
        (extract(epoch FROM NEW.update_time) * 1000000)::bigint::text, NEW.payment));
    RETURN NULL;
END
$$;
