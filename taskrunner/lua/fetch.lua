-- Read new entries for one consumer from one partition's priority-level streams (the
-- worker then claims each with claim.lua), in the order of the fairness rule
-- (docs/scheduling.md, "Priorities"):
--   1. `aged` reserved reads, each of the oldest unread entry of levels 2..L whose
--      entry has waited longer than aging_ms (none when no such entry waits);
--   2. then highest level first, oldest first within a level, at most cap_i entries of
--      level i, until `count` entries in all.
-- When every level was open to the read (every cap >= count) and the partition had
-- fewer unread entries than asked for, it marks the partition idle, so the next
-- enqueue publishes "ready" and wakes the waiting workers.
-- KEYS: stream_1 .. stream_L (highest level first), idle, paused
-- ARGV: group, consumer, count, aging_ms, clock_offset_ms, aged, cap_1 .. cap_L
-- Returns {"paused"} while the queue is paused (nothing read), else a list of
--         {level_index, entry_id, {field, value, ...}}.
local L = #KEYS - 2
local idle, paused = KEYS[L + 1], KEYS[L + 2]
if redis.call('EXISTS', paused) == 1 then
  return {'paused'}
end
local group, consumer, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local aging, aged = tonumber(ARGV[4]), tonumber(ARGV[6])
local out = {}

local function take(i, n)
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n,
    'STREAMS', KEYS[i], '>')
  if not reply then
    return 0
  end
  local entries = reply[1][2]
  for _, entry in ipairs(entries) do
    out[#out + 1] = {i, entry[1], entry[2]}
  end
  return #entries
end

local function head_ms(i)
  local ids = unread({KEYS[i]}, {group, 1})
  if ids and #ids > 0 then
    return tonumber(string.match(ids[1], '^(%d+)'))
  end
  return nil
end

local want = count
if aged > 0 and L > 1 and want > 0 then
  local now = now_ms(ARGV[5])
  local heads = {}
  for i = 2, L do
    heads[i] = head_ms(i)
  end
  for _ = 1, math.min(aged, want) do
    local best
    for i = 2, L do
      if heads[i] and now - heads[i] > aging and (not best or heads[i] < heads[best]) then
        best = i
      end
    end
    if not best then
      break
    end
    want = want - take(best, 1)
    heads[best] = head_ms(best)
  end
end
local open = true
for i = 1, L do
  local cap = tonumber(ARGV[6 + i])
  if cap < count then
    open = false
  end
  if want > 0 and cap > 0 then
    want = want - take(i, math.min(want, cap))
  end
end
if want > 0 and open then
  redis.call('SET', idle, '1')
end
return out
