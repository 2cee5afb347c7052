-- CreatePayment's write in one round trip (it was four: BEGIN, the per-order advisory lock, the
-- insert, COMMIT). The function takes the lock that mark_order_ended's transaction also takes,
-- then inserts the payment unless its order is over: in READ COMMITTED each statement of a
-- (volatile) function gets a fresh snapshot, so the insert's is taken after the lock and sees
-- every end marked before it, as the separate statements did. Called as one statement in
-- autocommit, the lock is held until that statement commits.
-- Returns (why the order is over: its end state in ended_orders, or PAYMENT_FAILED if a payment
-- of it failed; NULL if it is not) and whether the payment was inserted. A payment that is not
-- PENDING (the record of a dropped checkout) is inserted whether or not the order is over.
-- Raises unique_violation if the order has a live payment already (payments_one_live_per_order).
CREATE FUNCTION insert_payment_unless_ended(
    p_payment uuid, p_order uuid, p_hold text, p_user text, p_state text, p_currency text,
    p_units bigint, p_nanos integer, p_provider text, p_reference text, p_reason text,
    p_create timestamptz, p_update timestamptz, p_request uuid,
    OUT ended text, OUT inserted boolean)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_order::text, 0));
    WITH e AS (SELECT o.state FROM ended_orders o WHERE o.order_id = p_order
               UNION ALL
               SELECT 'PAYMENT_FAILED' FROM payments p
                WHERE p.order_id = p_order AND p.state = 'FAILED' LIMIT 1),
         ins AS (INSERT INTO payments (payment_id, order_id, hold, user_id, state, currency_code, units,
                                       nanos, provider, provider_reference, failure_reason, create_time,
                                       update_time, request_id)
                 SELECT p_payment, p_order, p_hold, p_user, p_state, p_currency, p_units, p_nanos,
                        p_provider, p_reference, p_reason, p_create, p_update, p_request
                 WHERE NOT EXISTS (SELECT 1 FROM e) OR p_state <> 'PENDING'
                 ON CONFLICT (user_id, request_id) DO NOTHING
                 RETURNING payment_id)
    SELECT (SELECT e.state FROM e LIMIT 1), EXISTS (SELECT 1 FROM ins) INTO ended, inserted;
END
$$;
