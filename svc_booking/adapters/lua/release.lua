-- Release a hold's seats (delete, cancel, expiry): only seats still held by this hold change.
-- KEYS: 1 seats, 2 deadlines, 3 fans, 4 hold key, 5 row runs (see hold.lua: a freed seat's row
--       drops its field and lowers its section's count of full rows), [6 request key: forgotten
--       if it names this hold, when the hold is taken back before it was written down, so a
--       retry is a new attempt]
-- ARGV: 1 hold id, 2 user, 3.. seats
-- Returns the number of seats made AVAILABLE.
local held = 'H' .. ARGV[1]
local freed = 0
for i = 3, #ARGV do
  if redis.call('HGET', KEYS[1], ARGV[i]) == held then
    redis.call('HSET', KEYS[1], ARGV[i], 'A')
    freed = freed + 1
    local section, row = string.match(ARGV[i], '^(.+)-(%d+)-%d+$')
    if section then
      redis.call('HDEL', KEYS[5], section .. '-' .. row)
      row = tonumber(row)
      if tonumber(redis.call('HGET', KEYS[5], section) or '0') >= row then
        redis.call('HSET', KEYS[5], section, row - 1)
      end
    end
  end
end
if freed > 0 then
  local left = redis.call('HINCRBY', KEYS[3], ARGV[2], -freed)
  if left <= 0 then redis.call('HDEL', KEYS[3], ARGV[2]) end
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[4])
if KEYS[6] and redis.call('GET', KEYS[6]) == ARGV[1] then redis.call('DEL', KEYS[6]) end
return freed
