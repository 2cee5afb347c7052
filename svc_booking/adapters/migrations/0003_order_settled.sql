-- An order that leaves PENDING_PAYMENT (CONFIRMED, CANCELLED, EXPIRED) notifies the channel
-- order_settled with its id, on commit, whichever statement changed it: the consumer's sale, a
-- fan's cancel, the sweeper's expiry, a replica yet to be written. Every booking replica LISTENs
-- and wakes the WaitOrder calls waiting on that order (svc_booking/adapters/settled.py).
CREATE FUNCTION order_settled_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('order_settled', NEW.order_id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER order_settled AFTER UPDATE OF state ON orders
    FOR EACH ROW WHEN (OLD.state = 'PENDING_PAYMENT' AND NEW.state <> 'PENDING_PAYMENT')
    EXECUTE FUNCTION order_settled_notify();
