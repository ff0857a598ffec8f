-- Give back a concurrency slot (idempotent: a slot already gone changes nothing) and
-- pick the waiters to wake for the slots now free: at most one per free slot, at most
-- 100, longest waiting first. Waiters that have not come back for 3 leases (their job
-- is gone) are dropped, at most 100 a call. It touches only the limit's keys.
-- KEYS: running, waiting
-- ARGV: holder ('' to only pick waiters), concurrency, lease_ms
-- Returns the waiters to wake (members: queue TAB partition TAB job id).
local running, waiting = KEYS[1], KEYS[2]
local limit, lease = tonumber(ARGV[2]), tonumber(ARGV[3])
local real = now_ms('0')
if ARGV[1] ~= '' then
  redis.call('ZREM', running, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', running, '-inf', real)
local room = limit - redis.call('ZCARD', running)
if room <= 0 or redis.call('EXISTS', waiting) == 0 then
  return {}
end
local stale = redis.call('ZRANGEBYSCORE', waiting, '-inf', real - 3 * lease, 'LIMIT', 0, 100)
for _, member in ipairs(stale) do
  redis.call('ZREM', waiting, member)
end
local found = redis.call('ZRANGE', waiting, 0, math.min(room, 100) - 1)
for _, member in ipairs(found) do
  redis.call('ZREM', waiting, member)
end
return found
