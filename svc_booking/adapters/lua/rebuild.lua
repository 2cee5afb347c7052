-- Build an event's live state from PostgreSQL's snapshot, unless it exists (first writer wins).
-- KEYS: 1 meta, 2 seats, 3 deadlines, 4 fans, 5 row runs (see hold.lua; dropped), 6.. the request
--       keys of the live holds
-- ARGV: 1 limit, 2 now ms, 3 stamp (this build's id, see hold.lua), 4 n = number of seat args
--       (seat, value pairs), 5..4+n seat pairs, then m, then m deadline args (score, hold id
--       pairs), then k, then k fan args (user, count), then keep ms, then one hold id per request
--       key (so a retry still gets its first answer)
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local function hset_chunks(key, cmd, first, last)
  local i = first
  while i <= last do
    local j = math.min(i + 999, last)
    redis.call(cmd, key, unpack(ARGV, i, j))
    i = j + 1
  end
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local n = tonumber(ARGV[4])
hset_chunks(KEYS[2], 'HSET', 5, 4 + n)
local p = 5 + n
local m = tonumber(ARGV[p])
hset_chunks(KEYS[3], 'ZADD', p + 1, p + m)
p = p + m + 1
local k = tonumber(ARGV[p])
hset_chunks(KEYS[4], 'HSET', p + 1, p + k)
p = p + k + 1
local keep = ARGV[p]
for i = 6, #KEYS do redis.call('SET', KEYS[i], ARGV[p + i - 5], 'PX', keep) end
local unsold = 0  -- what sell.lua counts down: the house is sold out when it reaches 0
for i = 6, 4 + n, 2 do
  if ARGV[i] ~= 'S' then unsold = unsold + 1 end
end
redis.call('HSET', KEYS[1], 'limit', ARGV[1], 'built', ARGV[2], 'stamp', ARGV[3], 'unsold', unsold)
return 1
