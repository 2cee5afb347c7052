-- Claim the holds whose deadline passed, for one sweeper, for `lease` ms: their score moves to
-- now + lease, so another replica does not take them meanwhile, and a sweeper that dies before
-- finishing leaves them to be claimed again when the lease ends. Finishing removes them (release.lua
-- or sell.lua).
-- KEYS: 1 deadlines   ARGV: 1 now ms, 2 lease ms, 3 batch size
-- Returns {the earliest score left (a deadline or a lease's end; false if none), claimed ids...}.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local until_ms = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, h in ipairs(due) do redis.call('ZADD', KEYS[1], until_ms, h) end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
table.insert(due, 1, first[2] or false)
return due
