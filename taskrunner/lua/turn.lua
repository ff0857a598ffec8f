-- Take this partition's reclaim turn: at most one scan for stale entries per period
-- across all workers (a worker that loses the race does nothing this period).
-- KEYS: reclaim
-- ARGV: period_ms, clock_offset_ms, worker
-- Returns 1 this caller's turn, 0 not.
local now = now_ms(ARGV[2])
if (tonumber(redis.call('HGET', KEYS[1], 'until')) or 0) > now then
  return 0
end
redis.call('HSET', KEYS[1], 'until', now + tonumber(ARGV[1]), 'holder', ARGV[3])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[1]))  -- gone once no worker scans
return 1
