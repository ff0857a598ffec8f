-- Read new entries for one consumer from one partition's priority-level streams,
-- highest level first (the worker then claims each with claim.lua). Anti-starvation:
-- with aging_ms > 0, a lower level whose oldest unread entry has waited longer than
-- aging_ms gets up to a tenth of the count (at least one) before the higher levels.
-- When the partition has fewer unread entries than asked for, it marks the partition
-- idle, so the next enqueue publishes "ready" and wakes the waiting workers.
-- KEYS: stream_1 .. stream_L (highest level first), idle, paused
-- ARGV: group, consumer, count, aging_ms, clock_offset_ms
-- Returns {"paused"} while the queue is paused (nothing read), else a list of
--         {level_index, entry_id, {field, value, ...}}.
local L = #KEYS - 2
local idle, paused = KEYS[L + 1], KEYS[L + 2]
if redis.call('EXISTS', paused) == 1 then
  return {'paused'}
end
local group, consumer, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
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

local function oldest_unread(stream)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
  if not ok then
    return nil  -- no such stream: XREADGROUP below reports NOGROUP
  end
  for _, g in ipairs(groups) do
    local name, last
    for k = 1, #g, 2 do
      if g[k] == 'name' then name = g[k + 1] end
      if g[k] == 'last-delivered-id' then last = g[k + 1] end
    end
    if name == group and last then
      local next_entry = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', 1)
      if #next_entry > 0 then
        return tonumber(string.match(next_entry[1][1], '^(%d+)'))
      end
      return nil
    end
  end
  return nil
end

local want = count
local aging = tonumber(ARGV[4])
if aging > 0 and L > 1 and want > 0 then
  local now = now_ms(ARGV[5])
  for i = L, 2, -1 do
    local oldest = oldest_unread(KEYS[i])
    if oldest and now - oldest > aging then
      want = want - take(i, math.max(1, math.floor(count / 10)))
      break
    end
  end
end
for i = 1, L do
  if want <= 0 then
    break
  end
  want = want - take(i, want)
end
if want > 0 then
  redis.call('SET', idle, '1')
end
return out
