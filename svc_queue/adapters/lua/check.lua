-- Is this admission (user's ticket KEYS[1], token ARGV jti) an active session now? {1|0, exp ms,
-- room exists 1|0}. The room's config (KEYS[2]) is read only for a "no": a missing room is one
-- the queue may rebuild from catalog (svc_queue/recovery.py).
local t = redis.call('HMGET', KEYS[1], 's', 'jti', 'exp')
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
if t[1] == 'A' and t[2] == ARGV[1] and tonumber(t[3]) > now then return {1, tonumber(t[3]), 1} end
return {0, 0, redis.call('EXISTS', KEYS[2])}
