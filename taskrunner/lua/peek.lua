-- What a worker reading several partitions looks at before it reads: the unread entry
-- ids of one partition's priority levels, highest level first, oldest first, and the
-- server's "now", so it can choose the entries to read across partitions by the
-- fairness rule (then fetch.lua reads them, with a cap per level). It stops once it
-- has `count` ids (the worker could not take more of this partition), except that
-- with `heads` = 1 (this read has a take reserved for aged jobs) it also gives the
-- oldest unread id of each lower level. Marks the partition idle when it has no unread
-- entry, so the next enqueue publishes "ready".
-- KEYS: stream_1 .. stream_L (highest level first), idle, paused
-- ARGV: group, count, clock_offset_ms, heads
-- Returns {"paused"}, {"nogroup"} (a level stream has entries but not the group),
--         else {now_ms, ids_1, .., ids_L}.
local L = #KEYS - 2
local idle, paused = KEYS[L + 1], KEYS[L + 2]
if redis.call('EXISTS', paused) == 1 then
  return {'paused'}
end
local count, heads = tonumber(ARGV[2]), ARGV[4] == '1'
local out = {now_ms(ARGV[3])}
local found = 0
for i = 1, L do
  local ids = {}
  if found < count then
    ids = unread({KEYS[i]}, {ARGV[1], count - found})
  elseif heads and i > 1 then
    ids = unread({KEYS[i]}, {ARGV[1], 1})
  end
  if not ids then
    return {'nogroup'}
  end
  out[i + 1] = ids
  found = found + #ids
end
if found == 0 then
  redis.call('SET', idle, '1')
end
return out
