-- Hold seats all-or-nothing for one fan, in one step: the seats named, or the best free ones.
-- KEYS: 1 meta, 2 seats, 3 deadlines, 4 fans, 5 request key, 6 hold key, 7 row runs (below)
--       (all {inv:<event>})
-- ARGV: 1 user, 2 hold id, 3 now ms, 4 expire ms, 5 keep ms (request key / hold record), then
--       either 6.. the seats, or (best available) 6 '' (no seat id is empty), 7 quantity, 8.. one
--       (section, rows, seats per row) triple per section to look in, best first
-- Seat values: "A" available, "H<hold id>" held (hold or unpaid order), "S" sold.
-- Returns {"OK", stamp, seats...} | {"NOINV"} (no live state: rebuild it) | {"DUP", hold id}
--       | {"UNKNOWN", seats...} | {"TAKEN", seats...} | {"LIMIT", used, limit}
--       | {"NONE", longest} (best available: no `quantity` free seats side by side; the most
--         there are, 0 if no seat is free)
-- stamp: the build of the live state this hold was made on (meta's `stamp`, '' if none); booking
-- writes the hold down only while PostgreSQL's events.live_stamp is the same.
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOINV'} end
local prev = redis.call('GET', KEYS[5])
if prev then return {'DUP', prev} end
local best = ARGV[6] == ''
local n = best and tonumber(ARGV[7]) or #ARGV - 5
local limit = tonumber(redis.call('HGET', KEYS[1], 'limit'))
local used = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')

-- Row runs (KEYS[7]): field "<section>-<row>" -> the longest run of free seats side by side in
-- that row, exact whenever present: anything that changes a row's free seats drops its field (this
-- script, release.lua; a rebuild drops them all) and a pick that reads the row writes it again.
-- Field "<section>" (section names hold no '-') -> k: rows 1..k of the section have no free seat,
-- where a pick starts (release.lua lowers it below a freed seat's row).
local function row_of(seat) return string.match(seat, '^(.+)-%d+$') end

-- The row's seat ids and values (HMGET in chunks: a row may be long, Lua's stack is not).
local function read_row(prefix, per)
  local ids, vals = {}, {}
  for first = 1, per, 500 do
    local chunk = {}
    for i = first, math.min(first + 499, per) do chunk[#chunk + 1] = prefix .. i end
    local got = redis.call('HMGET', KEYS[2], unpack(chunk))
    for i = 1, #chunk do ids[#ids + 1] = chunk[i]; vals[#vals + 1] = got[i] end
  end
  return ids, vals
end

-- The best run of q free seats side by side in one row: sections in the given order, rows from
-- the front, in a row one that leaves no seat alone beside it if it can, then the one nearest
-- the row's middle; nil and the longest run seen if none.
local function pick(q)
  local longest = 0
  for s = 8, #ARGV, 3 do
    local name, rows, per = ARGV[s], tonumber(ARGV[s + 1]), tonumber(ARGV[s + 2])
    local first, size = tonumber(redis.call('HGET', KEYS[7], name) or '0') + 1, 16
    local leading = true  -- every row before the one at hand has no free seat
    while first <= rows do
      local fields = {}
      for r = first, math.min(first + size - 1, rows) do fields[#fields + 1] = name .. '-' .. r end
      local known = redis.call('HMGET', KEYS[7], unpack(fields))
      for j = 1, #fields do
        local k = tonumber(known[j])
        if k == nil or k >= q then
          local ids, vals = read_row(fields[j] .. '-', per)
          local at, off, max = nil, nil, 0
          local i = 1
          while i <= per do  -- each block of free seats l..r
            if vals[i] == 'A' then
              local l = i
              while i < per and vals[i + 1] == 'A' do i = i + 1 end
              local r = i
              if r - l + 1 > max then max = r - l + 1 end
              for a = l, r - q + 1 do
                -- A run that leaves one seat alone beside it is worse than any that does not
                -- (a single is hard to sell); then the nearer the middle the better: twice
                -- the run's distance from the row's middle.
                local lone = (a - l == 1 and 1 or 0) + (r - (a + q - 1) == 1 and 1 or 0)
                local score = lone * 4 * per + math.abs(2 * a + q - 1 - (per + 1))
                if at == nil or score < off then at, off = a, score end
              end
            end
            i = i + 1
          end
          if at then
            redis.call('HDEL', KEYS[7], fields[j])  -- the pick changes the row
            local out = {}
            for i = at, at + q - 1 do out[#out + 1] = ids[i] end
            return out, max
          end
          redis.call('HSET', KEYS[7], fields[j], max)
          k = max
        end
        if k > longest then longest = k end
        if leading and k == 0 then redis.call('HSET', KEYS[7], name, first + j - 1) else leading = false end
      end
      first, size = first + size, math.min(size * 4, 512)  -- most picks end in the first rows read
    end
  end
  return nil, longest
end

local seats = {}
if best then
  if used + n > limit then return {'LIMIT', tostring(used), tostring(limit)} end
  local longest
  seats, longest = pick(n)
  if not seats then return {'NONE', tostring(longest)} end
else
  local unknown, taken = {}, {}
  for i = 6, #ARGV do
    local v = redis.call('HGET', KEYS[2], ARGV[i])
    if not v then unknown[#unknown + 1] = ARGV[i]
    elseif v ~= 'A' then taken[#taken + 1] = ARGV[i] end
    seats[#seats + 1] = ARGV[i]
  end
  if #unknown > 0 then return {'UNKNOWN', unpack(unknown)} end
  if #taken > 0 then return {'TAKEN', unpack(taken)} end
  if used + n > limit then return {'LIMIT', tostring(used), tostring(limit)} end
  for i = 1, #seats do
    local row = row_of(seats[i])
    if row then redis.call('HDEL', KEYS[7], row) end  -- (booking's seat ids always have a row)
  end
end
local held = 'H' .. ARGV[2]
local fields = {}
for i = 1, #seats do
  fields[#fields + 1] = seats[i]
  fields[#fields + 1] = held
end
redis.call('HSET', KEYS[2], unpack(fields))
redis.call('HINCRBY', KEYS[4], ARGV[1], n)
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('HSET', KEYS[6], 'user', ARGV[1], 'seats', table.concat(seats, ','), 'exp', ARGV[4],
           'created', ARGV[3])
redis.call('PEXPIRE', KEYS[6], ARGV[5])
redis.call('SET', KEYS[5], ARGV[2], 'PX', ARGV[5])
return {'OK', redis.call('HGET', KEYS[1], 'stamp') or '', unpack(seats)}
