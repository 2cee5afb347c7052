-- Leave: ARGV user. Frees what the fan holds at once: a lottery entry, a place (its number is then
-- skipped without using capacity), a reserved unclaimed slot, or an active session. Idempotent.
local user = ARGV[1]
local now = now_ms()
local cfg = load_cfg()
if not cfg then return {'ERR', 'EVENT_NOT_FOUND'} end
local st = load_st()
draw(now, cfg, st)
local t = redis.call('HMGET', U, 's', 'n', 'lr', 'jti', 'exp')
local s = t[1]
if s == 'W' then
  local n = number_of(user, t, st)
  if n == 0 then
    redis.call('ZREM', LOT, user)
  elseif n > st.serving then
    redis.call('SADD', LEFT, n)
    retain(cfg, {LEFT})  -- the set may be new: no key of a room outlives it
  else
    redis.call('ZREM', PEND, n)
  end
  redis.call('HSET', U, 's', 'L')
  redis.call('HINCRBY', STATS, 'left', 1)
elseif s == 'A' then
  redis.call('ZREM', ACT, user)
  if tonumber(t[5]) > now then
    redis.call('HSET', U, 's', 'L')
    redis.call('HINCRBY', STATS, 'left', 1)
  else
    redis.call('HSET', U, 's', 'E')
  end
end
return with_room(view(user, now, cfg, st, nil), now, cfg, st)
