-- Keep the first admission token signed for this session (KEYS[1] the ticket; ARGV jti, token);
-- returns the kept token, or false when the session is no longer the one with this jti.
local t = redis.call('HMGET', KEYS[1], 's', 'jti')
if t[1] ~= 'A' or t[2] ~= ARGV[1] then return false end
redis.call('HSETNX', KEYS[1], 'tok', ARGV[2])
return redis.call('HGET', KEYS[1], 'tok')
