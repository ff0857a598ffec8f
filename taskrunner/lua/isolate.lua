-- Mark a running attempt as running alone in its worker (no other job beside it), so
-- that if its worker dies now, the crash is charged to this job (requeue.lua).
-- KEYS: job
-- ARGV: token
-- Returns 1 marked, 0 lost lease.
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'alone', ARGV[1])
return 1
