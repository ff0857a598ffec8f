-- Take this partition's reclaim turn: at most one scan for stale entries per period
-- across all workers (a worker that loses the race does nothing this period).
-- KEYS: reclaim
-- ARGV: period_ms, clock_offset_ms, worker
-- Returns 1 this caller's turn, 0 not.
local now = now_ms(ARGV[2])
local period = tonumber(ARGV[1])
-- a turn ends at most one period after it was taken: a later 'until' (hostile, or
-- written under another period) does not hold the turn, or reclaims would stop
local held = tonumber(redis.call('HGET', KEYS[1], 'until')) or 0
if held > now and held <= now + period then
  return 0
end
redis.call('HSET', KEYS[1], 'until', now + period, 'holder', ARGV[3])
redis.call('PEXPIRE', KEYS[1], 2 * period)  -- gone once no worker scans
return 1
