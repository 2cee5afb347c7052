-- Are these admissions active sessions now? KEYS[1]: the room's config; KEYS[1 + i]: a user's
-- ticket, ARGV[i]: the `jti` of the token presented for it. Returns {exp ms or 0 for each, then
-- room exists 1|0}. The room's config is read only when some answer is "no": a missing room is
-- one the queue may rebuild from catalog (svc_queue/recovery.py).
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local out, all = {}, true
for i = 1, #ARGV do
  local t = redis.call('HMGET', KEYS[i + 1], 's', 'jti', 'exp')
  local exp = tonumber(t[3])
  if t[1] == 'A' and t[2] == ARGV[i] and exp and exp > now then
    out[i] = exp
  else
    out[i] = 0
    all = false
  end
end
out[#ARGV + 1] = all and 1 or redis.call('EXISTS', KEYS[1])
return out
