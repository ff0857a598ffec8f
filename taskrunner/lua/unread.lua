-- The ids of up to `count` entries of one stream its consumer group has not read yet,
-- oldest first; an empty list for an empty or missing stream (XLEN, O(1): most level
-- streams of a queue are empty); false when the stream has entries but not the group.
-- Read only. A helper of fetch.lua and peek.lua (included as the local function
-- unread(KEYS, ARGV)).
-- KEYS: stream
-- ARGV: group, count
if redis.call('XLEN', KEYS[1]) == 0 then
  return {}
end
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok then
  return false
end
for _, g in ipairs(groups) do
  local name, last
  for k = 1, #g, 2 do
    if g[k] == 'name' then name = g[k + 1] end
    if g[k] == 'last-delivered-id' then last = g[k + 1] end
  end
  if name == ARGV[1] and last then
    local ids = {}
    for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', ARGV[2])) do
      ids[#ids + 1] = entry[1]
    end
    return ids
  end
end
return false
