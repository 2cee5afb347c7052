-- Change room settings: ARGV field, value, ... (validated by the caller: max rate paused ttl).
-- The admission step reads them on its next tick.
if redis.call('EXISTS', CFG) == 0 then return {'ERR', 'EVENT_NOT_FOUND'} end
if #ARGV > 0 then redis.call('HSET', CFG, unpack(ARGV)) end
local now = now_ms()
return status(now, load_cfg(), load_st())
