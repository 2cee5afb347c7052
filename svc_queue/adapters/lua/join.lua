-- Join: ARGV user, lottery score (secret, from the caller's CSPRNG).
-- Idempotent: a fan who is waiting or active keeps their ticket. A fan who left or whose turn or
-- session ran out gets a new place: in the lottery pool (with the score they first drew, so
-- leaving cannot re-roll it) before the sale opens, at the back of the line after.
local user, score = ARGV[1], ARGV[2]
local now = now_ms()
local cfg = load_cfg()
if not cfg then return {'ERR', 'EVENT_NOT_FOUND'} end
if now < cfg.qo then return {'ERR', 'QUEUE_NOT_OPEN', cfg.qo} end
-- Once the show starts the room is no longer ticked: a new place would never be served.
if cfg.start > 0 and now >= cfg.start then return {'ERR', 'QUEUE_CLOSED', cfg.start} end
local st = load_st()
draw(now, cfg, st)
local s = redis.call('HGET', U, 's')
if s == 'W' or s == 'A' then
  -- A turn or session that ran out since the fan last looked ends here (view marks it E), and
  -- this join then places the fan again, as it would had they read queue/me first.
  local v = view(user, now, cfg, st, nil)
  if v[1] ~= 'EXPIRED' then return with_room(v, now, cfg, st) end
end
-- Sold out: whoever joins anew (never joined, left, expired, done) gets no number.
if cfg.sold then return with_room({'SOLD_OUT', 0, 0}, now, cfg, st) end
redis.call('HDEL', U, 'jti', 'exp', 'ca', 'tok')
if not st.drawn then
  local r = redis.call('HGET', U, 'r') or score
  redis.call('ZADD', LOT, r, user)
  redis.call('HSET', U, 's', 'W', 'n', 0, 'lr', 1, 'r', r)
else
  st.seq = redis.call('HINCRBY', ST, 'seq', 1)
  redis.call('HSET', U, 's', 'W', 'n', st.seq, 'lr', 0)
end
redis.call('HINCRBY', STATS, 'joined', 1)
retain(cfg, {U, ST, LOT, STATS})
return with_room(view(user, now, cfg, st, nil), now, cfg, st)
