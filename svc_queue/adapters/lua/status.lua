-- The public room status (one small read; changes nothing).
local now = now_ms()
local cfg = load_cfg()
if not cfg then return {'ERR', 'EVENT_NOT_FOUND'} end
return status(now, cfg, load_st())
