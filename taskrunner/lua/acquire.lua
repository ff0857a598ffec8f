-- Take a slot of a rate and/or concurrency limit for one attempt, or say how long to
-- wait. It touches only the limit's own keys (one Cluster slot: the limit digest's
-- hash tag), so it is not atomic with the job's commit; middleware/limits.py says why
-- that is still safe (leases expire, release is idempotent).
-- KEYS: running, starts, waiting
-- ARGV: holder (the attempt's lease token), waiter (queue TAB partition TAB job id),
--       concurrency (0: none), lease_ms, rate (0: none), period_ms, clock
-- Concurrency slots are leases scored by their expiry in the server's real time (TIME),
-- renewed by the holder's worker (renew.lua) and dropped here once expired. The rate
-- window follows the runner's clock (now_ms(clock)): a start counts for period_ms.
-- Both limits are checked before either is taken, so a refused attempt holds nothing.
-- Returns {0, 0, woken}: taken; woken = waiters (members) to wake because slots
--                        are still free after this one (at most 100),
--         {1, wait_ms}: every concurrency slot is held: the caller is registered as a
--                       waiter; the earliest holder's lease ends in wait_ms (at most
--                       two leases),
--         {2, wait_ms}: the rate window is full: its oldest start leaves in wait_ms (at
--                       most two periods).
-- Hostile scores (a holder more than a hundred leases or a day ahead, whichever is
-- longer, a start more than a period ahead: inf, 1e20) are dropped when they would
-- make a check refuse.
local running, starts, waiting = KEYS[1], KEYS[2], KEYS[3]
local holder, waiter = ARGV[1], ARGV[2]
local limit, lease = tonumber(ARGV[3]), tonumber(ARGV[4])
local rate, period = tonumber(ARGV[5]), tonumber(ARGV[6])
local real = now_ms('0')

local function pop_waiters(room)
  local stale = redis.call('ZRANGEBYSCORE', waiting, '-inf', real - 3 * lease, 'LIMIT', 0, 100)
  for _, member in ipairs(stale) do
    redis.call('ZREM', waiting, member)
  end
  local found = redis.call('ZRANGE', waiting, 0, math.min(room, 100) - 1)
  for _, member in ipairs(found) do
    redis.call('ZREM', waiting, member)
  end
  return found
end

local held = 0
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', running, '-inf', real)
  held = redis.call('ZCARD', running)
  if held >= limit and not redis.call('ZSCORE', running, holder) then
    -- a holder's score is its lease's expiry, a lease ahead (of the worker that holds
    -- it: its stale_after may be longer than this one's); one more than a hundred
    -- leases or a day ahead (inf, 1e20: hostile) would hold its slot for ever:
    -- dropped, on this refused path only
    local bound = real + math.max(100 * lease, 86400000)
    held = held - redis.call('ZREMRANGEBYSCORE', running, '(' .. string.format('%d', bound),
      '+inf')
    if held >= limit then
      redis.call('ZADD', waiting, real, waiter)
      if redis.call('PTTL', waiting) < 3 * lease then
        redis.call('PEXPIRE', waiting, 3 * lease)
      end
      local first = redis.call('ZRANGE', running, 0, 0, 'WITHSCORES')
      return {1, math.min(math.max(0, tonumber(first[2]) - real), 2 * lease)}
    end
  end
end
if rate > 0 then
  local clock = ARGV[7]
  local now = now_ms(clock)
  redis.call('ZREMRANGEBYSCORE', starts, '-inf', now - period)
  local count = redis.call('ZCARD', starts)
  if count >= rate then
    -- a start's score is its start time: one more than a period ahead (inf, 1e20:
    -- hostile) would fill the window for ever: dropped, on this full path only
    count = count - redis.call('ZREMRANGEBYSCORE', starts,
      '(' .. string.format('%d', now + period), '+inf')
  end
  if count >= rate then
    local oldest = redis.call('ZRANGE', starts, 0, 0, 'WITHSCORES')
    return {2, math.min(math.max(1, tonumber(oldest[2]) + period - now), 2 * period)}
  end
  redis.call('ZADD', starts, now, holder)
  if string.sub(clock, 1, 1) == '=' then
    redis.call('PEXPIRE', starts, 86400000)  -- a frozen test clock: real time says nothing
  else
    redis.call('PEXPIRE', starts, period)
  end
end
local woken = {}
if limit > 0 then
  if not redis.call('ZSCORE', running, holder) then
    held = held + 1
  end
  redis.call('ZADD', running, real + lease, holder)
  redis.call('ZREM', waiting, waiter)
  if redis.call('PTTL', running) < lease then
    redis.call('PEXPIRE', running, lease)
  end
  if held < limit and redis.call('EXISTS', waiting) == 1 then
    woken = pop_waiters(limit - held)
  end
end
return {0, 0, woken}
