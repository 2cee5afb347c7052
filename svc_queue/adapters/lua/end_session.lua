-- End a fan's active session at once (order confirmed or cancelled, revoked): ARGV user, the
-- state to leave (D ended, E expired), the marker's lifetime in ms, and (for an event) when it
-- happened (ms; 0: now): a session claimed after that is a newer one and is left alone. KEYS[9],
-- when given, marks a Kafka event as handled in the same atomic step (a redelivery is a no-op).
-- Returns {ended (1/0), duplicate (1/0)}.
local user, to, mark_ms = ARGV[1], ARGV[2], tonumber(ARGV[3] or '0')
local happened = tonumber(ARGV[4] or '0')
local mark = KEYS[9]
if mark and redis.call('EXISTS', mark) == 1 then return {0, 1} end
local now = now_ms()
local t = redis.call('HMGET', U, 's', 'exp', 'ca')
local ended = 0
if t[1] == 'A' and happened > 0 and tonumber(t[3] or '0') > happened then
  t[1] = 'newer' -- the fan was admitted again after the event: not this session
end
if t[1] == 'A' then
  redis.call('ZREM', ACT, user)
  if tonumber(t[2]) > now then
    redis.call('HSET', U, 's', to)
    redis.call('HINCRBY', STATS, 'ended', 1)
    ended = 1
  else
    redis.call('HSET', U, 's', 'E')
  end
end
if mark then redis.call('SET', mark, '1', 'PX', mark_ms) end
return {ended, 0}
