-- What a worker reading several partitions looks at before it reads: up to `count`
-- unread entry ids of each priority level of one partition, oldest first, and the
-- server's "now", so it can choose the entries to read across partitions by the
-- fairness rule (then fetch.lua reads them, with a cap per level). Marks the partition
-- idle when it has no unread entry, so the next enqueue publishes "ready".
-- KEYS: stream_1 .. stream_L (highest level first), idle, paused
-- ARGV: group, count, clock_offset_ms
-- Returns {"paused"}, {"nogroup"} (a level stream or its group is missing), else
--         {now_ms, ids_1, .., ids_L}.
local L = #KEYS - 2
local idle, paused = KEYS[L + 1], KEYS[L + 2]
if redis.call('EXISTS', paused) == 1 then
  return {'paused'}
end
local out = {now_ms(ARGV[3])}
local any = false
for i = 1, L do
  local ids = unread({KEYS[i]}, {ARGV[1], ARGV[2]})
  if not ids then
    return {'nogroup'}
  end
  out[i + 1] = ids
  any = any or #ids > 0
end
if not any then
  redis.call('SET', idle, '1')
end
return out
