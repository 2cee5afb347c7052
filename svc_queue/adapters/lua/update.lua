-- Change room settings: ARGV field, value, ... (validated by the caller: max rate paused ttl).
-- The admission step reads them on its next tick.
if redis.call('EXISTS', CFG) == 0 then return {'ERR', 'EVENT_NOT_FOUND'} end
local was = load_cfg()
if #ARGV > 0 then redis.call('HSET', CFG, unpack(ARGV)) end
local now = now_ms()
local cfg = load_cfg()
-- Unpaused: the token bucket starts empty now. A paused room is ticked once a minute at most, so
-- the bucket's last refill may be long past, and the first tick would admit a whole second's
-- worth at once.
if was.paused and not cfg.paused and redis.call('EXISTS', ST) == 1 then
  redis.call('HSET', ST, 'tk', 0, 'tt', now)
end
return status(now, cfg, load_st())
