-- The fan's ticket (queue/me): ARGV user, a fresh jti used if this read claims the fan's turn.
local user, jti = ARGV[1], ARGV[2]
local now = now_ms()
local cfg = load_cfg()
if not cfg then return {'ERR', 'EVENT_NOT_FOUND'} end
local st = load_st()
draw(now, cfg, st)
return with_room(view(user, now, cfg, st, jti), now, cfg, st)
