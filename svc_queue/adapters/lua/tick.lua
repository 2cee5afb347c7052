-- One admission step for one room; any number of replicas may run it at any time.
-- 1. sweep: expired sessions and unclaimed reserved slots leave the sorted sets (slots freed);
-- 2. refill the room's token bucket (rate per second, at most one second's worth, stored here so
--    several replicas share one rate);
-- 3. advance `serving` over existing numbers only: a left fan's number is skipped for free, any
--    other takes one token and one slot (reserved in `pend` until claimed), while
--    active + reserved < max. Paused, sold out or before the sale: no advance.
-- Returns {admitted, serving, skipped, expired sessions, unclaimed, closed (show started),
-- wait_ms (how soon this room needs its next tick: 0 while fans wait to be admitted, up to
-- IDLE_MS before the sale opens, while nobody waits, and while the room is paused or sold out)}.
local now = now_ms()
local cfg = load_cfg()
if not cfg then return {-1} end
local st = load_st()
draw(now, cfg, st)
local expired = redis.call('ZREMRANGEBYSCORE', ACT, '-inf', now)
local unclaimed = redis.call('ZREMRANGEBYSCORE', PEND, '-inf', now)
if expired > 0 then redis.call('HINCRBY', STATS, 'expired', expired) end
if unclaimed > 0 then redis.call('HINCRBY', STATS, 'unclaimed', unclaimed) end
local admitted, skipped = 0, 0
if not st.drawn or cfg.paused or cfg.sold then
  redis.call('HSET', ST, 'tk', 0, 'tt', now)
else
  local tt = st.tt
  if tt <= 0 or tt > now then tt = now end
  -- tokens accrue from the sale's opening, not from the last tick before it (up to IDLE_MS)
  if tt < cfg.so then tt = math.min(cfg.so, now) end
  local tk = math.min(math.max(1, cfg.rate), st.tk + cfg.rate * (now - tt) / 1000)
  local free = cfg.max - redis.call('ZCARD', ACT) - redis.call('ZCARD', PEND)
  local budget = math.min(math.floor(tk), free)
  local serving = st.serving
  local deadline = now + cfg.claim
  local steps = 0
  while serving < st.seq and steps < MAX_STEPS do
    local nx = serving + 1
    if redis.call('SREM', LEFT, nx) == 1 then
      skipped = skipped + 1
    elseif admitted < budget then
      redis.call('ZADD', PEND, deadline, nx)
      admitted = admitted + 1
    else
      break
    end
    serving = nx
    steps = steps + 1
  end
  st.serving = serving
  redis.call('HSET', ST, 'serving', serving, 'tk', tostring(tk - admitted), 'tt', now)
end
-- the measured admission rate: an exponentially weighted moving average (time constant TAU_MS)
local m = redis.call('HMGET', STATS, 'mr', 'mt')
local mt = tonumber(m[2] or '0')
if mt > 0 and mt <= now then
  local mr = tonumber(m[1] or '0') * math.exp(-(now - mt) / TAU_MS) + admitted * 1000 / TAU_MS
  redis.call('HSET', STATS, 'mr', tostring(mr), 'mt', now)
end
if admitted > 0 then redis.call('HINCRBY', STATS, 'admitted', admitted) end
retain(cfg, {ST, LEFT, PEND, ACT, STATS})
local closed = 0
if cfg.start > 0 and now >= cfg.start then closed = 1 end
local wait = 0
if not st.drawn then
  wait = math.min(IDLE_MS, math.max(0, cfg.so - now))
elseif st.serving >= st.seq or cfg.paused or cfg.sold then
  wait = IDLE_MS -- nobody to admit, or nobody may be: an unpause pokes the room
end
return {admitted, st.serving, skipped, expired, unclaimed, closed, wait}
