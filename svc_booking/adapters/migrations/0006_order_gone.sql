-- An order row deleted (an operator's repair, a restore that dropped it) is announced on
-- order_settled too, as its bare id: a replica that knows the order without reading it (one it
-- made while listening, see svc_booking/adapters/settled.py) forgets it and reads it next time,
-- and a WaitOrder waiting on it reads it now (and finds it gone). The application itself never
-- deletes orders, so this costs a purchase nothing.
CREATE FUNCTION order_gone_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('order_settled', OLD.order_id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER order_gone AFTER DELETE ON orders
    FOR EACH ROW EXECUTE FUNCTION order_gone_notify();
