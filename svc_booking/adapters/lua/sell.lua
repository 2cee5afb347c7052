-- Mark an order's seats SOLD after PostgreSQL committed the sale (sold_seats is the truth).
-- KEYS: 1 meta, 2 seats, 3 deadlines, 4 hold key
-- ARGV: 1 hold id, 2.. seats
-- Without live state (Redis restarted) nothing is written: the rebuild reads sold_seats.
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 2, #ARGV do redis.call('HSET', KEYS[2], ARGV[i], 'S') end
return #ARGV - 1
