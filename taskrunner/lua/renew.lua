-- Renew the concurrency slots one worker holds under one limit: each lease is pushed
-- to now + lease_ms (server real time). A slot that is no longer there (its lease
-- expired and was dropped: the worker stalled longer than the lease) is not taken back.
-- KEYS: running
-- ARGV: lease_ms, holder_1 .. holder_n
-- Returns the holders that no longer hold a slot.
local running = KEYS[1]
local lease = tonumber(ARGV[1])
local expiry = now_ms('0') + lease
local lost = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', running, ARGV[i]) then
    redis.call('ZADD', running, 'XX', expiry, ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
if #lost < #ARGV - 1 and redis.call('PTTL', running) < lease then
  redis.call('PEXPIRE', running, lease)
end
return lost
