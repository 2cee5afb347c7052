-- No seat is left: admission stops, waiting and served-but-unclaimed fans see SOLD_OUT, new joins
-- get no number. Active sessions run on (their holders may be paying). Idempotent.
if redis.call('EXISTS', CFG) == 0 then return {'ERR', 'EVENT_NOT_FOUND'} end
redis.call('HSET', CFG, 'sold', '1')
redis.call('DEL', PEND)
local now = now_ms()
return status(now, load_cfg(), load_st())
