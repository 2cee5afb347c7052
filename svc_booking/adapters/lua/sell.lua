-- Mark an order's seats SOLD after PostgreSQL committed the sale (sold_seats is the truth).
-- KEYS: 1 meta, 2 seats, 3 deadlines, 4 hold key
-- ARGV: 1 hold id, 2.. seats
-- Returns how many seats of the event are not sold yet (meta's 'unsold', lowered by the seats
-- this call turned SOLD: a replay lowers it by nothing), or -1 when that count is not known:
-- no live state (Redis restarted: nothing is written, the rebuild reads sold_seats), or a live
-- state built before the count existed.
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4])
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local turned = 0
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) ~= 'S' then
    redis.call('HSET', KEYS[2], ARGV[i], 'S')
    turned = turned + 1
  end
end
if redis.call('HEXISTS', KEYS[1], 'unsold') == 0 then return -1 end
return redis.call('HINCRBY', KEYS[1], 'unsold', 0 - turned)  -- not -turned: -0 is not an integer to Redis
