-- An event was published (EventPublished): ARGV qo so start seats (the event's facts, ms) then
-- the defaults max rate ttl claim. Facts are written (a published event never changes); the
-- settings only where absent, so a redelivered event never undoes an admin's change.
redis.call('HSET', KEYS[1], 'qo', ARGV[1], 'so', ARGV[2], 'start', ARGV[3], 'seats', ARGV[4])
redis.call('HSETNX', KEYS[1], 'max', ARGV[5])
redis.call('HSETNX', KEYS[1], 'rate', ARGV[6])
redis.call('HSETNX', KEYS[1], 'ttl', ARGV[7])
redis.call('HSETNX', KEYS[1], 'claim', ARGV[8])
redis.call('HSETNX', KEYS[1], 'paused', '0')
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIREAT', KEYS[1], tonumber(ARGV[3]) + 2 * 86400000) end
return 1
