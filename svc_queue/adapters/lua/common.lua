-- The waiting room of one event. Every key below shares the hash tag {q:<event>}, so each script
-- touches one slot and runs unchanged on a single node and on Redis Cluster.
--
-- KEYS (the same order in every room script; unused trailing keys may be omitted):
--   1 cfg    hash  qo so start seats (from EventPublished), max rate paused ttl claim (settings),
--                  sold ("1" once sold out)
--   2 st     hash  seq (highest number given), serving, drawn ("1" after the lottery), lot (its
--                  size), tk/tt (token bucket: tokens, last refill ms)
--   3 lot    zset  lottery pool: user -> secret random score, filled before the sale opens
--   4 left   set   numbers above `serving` whose fans left (skipped, never admitted)
--   5 pend   zset  number -> claim deadline ms: served, slot reserved, not claimed yet
--   6 act    zset  user -> session deadline ms: active sessions
--   7 stats  hash  counters, and mr/mt/m0: the measured admission rate (EWMA)
--   8 u      hash  one fan's ticket: s (W waiting, A active, L left, E expired, D ended), n, lr
--                  (1: lottery ticket), r (lottery score), jti, exp, ca (claimed at), tok
--   9 mark   string  "event handled" marker of a Kafka event (EndSession from an order event)
--
-- Time is Redis' own clock (TIME), one clock per room whatever replica calls. Deadlines live in
-- the sorted sets and are swept here, never by keyspace notifications.

local CFG, ST, LOT, LEFT, PEND, ACT, STATS, U = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local TAU_MS = 10000 -- time constant of the measured admission rate
local MAX_STEPS = 5000 -- most numbers one tick walks over (admitted or skipped)
-- most an idle room (sale not open, nobody waiting, paused, sold out) waits for its next tick:
-- nothing in it needs one. The sale's opening is ticked to the millisecond, and what would (a
-- join, a waiting fan's queue/me, an admin change) pokes the room on the replica that served it,
-- so this only bounds what a replica that saw none of them misses.
local IDLE_MS = 60000
local RETAIN_MS = 2 * 86400000 -- a room's keys expire this long after its show starts

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function load_cfg()
  local v = redis.call('HMGET', CFG, 'qo', 'so', 'max', 'rate', 'paused', 'ttl', 'claim', 'sold', 'start')
  if not v[1] then return nil end
  return {qo = tonumber(v[1]), so = tonumber(v[2]), max = tonumber(v[3]), rate = tonumber(v[4]),
          paused = v[5] == '1', ttl = tonumber(v[6]), claim = tonumber(v[7]), sold = v[8] == '1',
          start = tonumber(v[9] or '0')}
end

local function load_st()
  local v = redis.call('HMGET', ST, 'seq', 'serving', 'drawn', 'tk', 'tt')
  return {seq = tonumber(v[1] or '0'), serving = tonumber(v[2] or '0'), drawn = v[3] == '1',
          tk = tonumber(v[4] or '0'), tt = tonumber(v[5] or '0')}
end

-- Nothing of a room outlives its show by more than RETAIN_MS (no manual cleanup needed).
local function retain(cfg, keys)
  if cfg.start > 0 then
    for _, k in ipairs(keys) do redis.call('PEXPIREAT', k, cfg.start + RETAIN_MS) end
  end
end

-- The lottery, once, by whichever script first runs at or after the sale opening: the fans who
-- joined before it hold numbers 1..N in the order of their secret random scores (a uniformly
-- random permutation); later arrivals take N+1, N+2, ... (FIFO).
local function draw(now, cfg, st)
  if st.drawn or now < cfg.so then return end
  local n = redis.call('ZCARD', LOT)
  st.drawn = true
  st.seq = st.seq + n
  redis.call('HSET', ST, 'drawn', '1', 'lot', n, 'seq', st.seq)
  redis.call('HSET', STATS, 'm0', now, 'mt', now, 'mr', 0)
end

-- A lottery ticket's number is its rank in the drawn pool, looked up once and stored.
local function number_of(user, t, st)
  local n = tonumber(t[2] or '0')
  if n == 0 and t[3] == '1' and st.drawn then
    local r = redis.call('ZRANK', LOT, user)
    if r then
      n = r + 1
      redis.call('HSET', U, 'n', n)
    end
  end
  return n
end

-- The fan's ticket: {state, number, position, jti, exp, token, fresh}. With `claim_jti`, a
-- served fan within the claim window becomes ACTIVE (the slot reserved at admission is theirs).
local function view(user, now, cfg, st, claim_jti)
  local t = redis.call('HMGET', U, 's', 'n', 'lr', 'jti', 'exp', 'tok')
  local s = t[1]
  if not s then  -- never joined (or the room was rebuilt); a sold-out room takes nobody in
    if cfg.sold then return {'SOLD_OUT', 0, 0} end
    return {'NOT_JOINED', 0, 0}
  end
  local n = tonumber(t[2] or '0')
  if s == 'A' then
    local exp = tonumber(t[5])
    if exp > now then return {'ACTIVE', n, 0, t[4], exp, t[6] or ''} end
    redis.call('ZREM', ACT, user)
    redis.call('HSET', U, 's', 'E')
    return {'EXPIRED', n, 0}
  end
  if s == 'L' then return {'LEFT', n, 0} end
  if s ~= 'W' then return {'EXPIRED', n, 0} end
  if cfg.sold then return {'SOLD_OUT', n, 0} end
  n = number_of(user, t, st)
  if n == 0 then return {'WAITING', 0, 0} end -- in the lottery pool, not drawn yet
  if n > st.serving then return {'WAITING', n, n - st.serving} end
  local deadline = tonumber(redis.call('ZSCORE', PEND, n) or '0')
  if deadline > now then
    if not claim_jti then return {'WAITING', n, 0} end -- served: the next queue/me claims
    redis.call('ZREM', PEND, n)
    local exp = now + cfg.ttl
    redis.call('ZADD', ACT, exp, user)
    retain(cfg, {ACT})  -- the set may be new (the room's last tick may be past): it must expire
    redis.call('HSET', U, 's', 'A', 'jti', claim_jti, 'exp', exp, 'ca', now)
    redis.call('HDEL', U, 'tok')
    redis.call('HINCRBY', STATS, 'claimed', 1)
    return {'ACTIVE', n, 0, claim_jti, exp, '', 1}
  end
  -- served, but the claim window passed (or the slot was swept): the turn is lost
  if deadline > 0 then
    redis.call('ZREM', PEND, n)
    redis.call('HINCRBY', STATS, 'unclaimed', 1)
  end
  redis.call('HSET', U, 's', 'E')
  return {'EXPIRED', n, 0}
end

-- The measured admission rate as stored: mr, mt, m0 (the EWMA, when, since when).
local function measured()
  local m = redis.call('HMGET', STATS, 'mr', 'mt', 'm0')
  return m[1] or '0', m[2] or '0', m[3] or '0'
end

-- What a ticket answer carries about the room (for the position's ETA).
local function with_room(v, now, cfg, st)
  local mr, mt, m0 = measured()
  return {v[1], v[2], v[3], v[4] or '', v[5] or 0, v[6] or '', v[7] or 0,
          now, cfg.so, tostring(cfg.rate), cfg.paused and 1 or 0, mr, mt, m0}
end

-- The public room status: {serving, waiting, active, rate, max, paused, ttl, sold, pending,
-- now, mr, mt, m0} (the last four for the measured rate, as in with_room).
local function status(now, cfg, st)
  local waiting
  if st.drawn then
    waiting = st.seq - st.serving - redis.call('SCARD', LEFT)
  else
    waiting = redis.call('ZCARD', LOT)
  end
  local active = redis.call('ZCOUNT', ACT, '(' .. now, '+inf')
  local pending = redis.call('ZCOUNT', PEND, '(' .. now, '+inf')
  local mr, mt, m0 = measured()
  return {st.serving, waiting, active, tostring(cfg.rate), cfg.max, cfg.paused and 1 or 0, cfg.ttl,
          cfg.sold and 1 or 0, pending, now, mr, mt, m0}
end
