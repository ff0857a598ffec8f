-- Remove a consumer from a queue's group if, and only if, it holds no entries (checked
-- and done in one step: XGROUP DELCONSUMER would drop the entries it held).
-- KEYS: stream
-- ARGV: group, consumer
-- Returns 1 removed, 0 kept (it holds entries, or there is no such group).
local ok, held = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if not ok or #held > 0 then
  return 0
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
