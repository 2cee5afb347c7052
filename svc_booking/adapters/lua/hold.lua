-- Hold seats all-or-nothing for one fan, in one step.
-- KEYS: 1 meta, 2 seats, 3 deadlines, 4 fans, 5 request key, 6 hold key   (all {inv:<event>})
-- ARGV: 1 user, 2 hold id, 3 now ms, 4 expire ms, 5 keep ms (request key / hold record), 6.. seats
-- Seat values: "A" available, "H<hold id>" held (hold or unpaid order), "S" sold.
-- Returns {"OK", stamp} | {"NOINV"} (no live state: rebuild it) | {"DUP", hold id}
--       | {"UNKNOWN", seats...} | {"TAKEN", seats...} | {"LIMIT", used, limit}
-- stamp: the build of the live state this hold was made on (meta's `stamp`, '' if none); booking
-- writes the hold down only while PostgreSQL's events.live_stamp is the same.
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOINV'} end
local prev = redis.call('GET', KEYS[5])
if prev then return {'DUP', prev} end
local n = #ARGV - 5
local unknown, taken = {}, {}
for i = 6, #ARGV do
  local v = redis.call('HGET', KEYS[2], ARGV[i])
  if not v then unknown[#unknown + 1] = ARGV[i]
  elseif v ~= 'A' then taken[#taken + 1] = ARGV[i] end
end
if #unknown > 0 then return {'UNKNOWN', unpack(unknown)} end
if #taken > 0 then return {'TAKEN', unpack(taken)} end
local limit = tonumber(redis.call('HGET', KEYS[1], 'limit'))
local used = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')
if used + n > limit then return {'LIMIT', tostring(used), tostring(limit)} end
local held = 'H' .. ARGV[2]
local fields, seats = {}, {}
for i = 6, #ARGV do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = held
  seats[#seats + 1] = ARGV[i]
end
redis.call('HSET', KEYS[2], unpack(fields))
redis.call('HINCRBY', KEYS[4], ARGV[1], n)
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('HSET', KEYS[6], 'user', ARGV[1], 'seats', table.concat(seats, ','), 'exp', ARGV[4],
           'created', ARGV[3])
redis.call('PEXPIRE', KEYS[6], ARGV[5])
redis.call('SET', KEYS[5], ARGV[2], 'PX', ARGV[5])
return {'OK', redis.call('HGET', KEYS[1], 'stamp') or ''}
