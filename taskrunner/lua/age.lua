-- Age one unique lock by the step a test's frozen clock moved (taskrunner.testing):
-- a lock's TTL runs on the server's real clock, so advancing the scripts' clock must
-- shorten it by as much. A lock whose holder is held by a worker (its job has a
-- lease) is left alone: that worker's heartbeat keeps it. Tests only.
-- KEYS: lock, holder's job hash
-- ARGV: holder job id (the lock's value when it was read), step_ms
-- Returns 0 left alone, 1 shortened, 2 expired (deleted).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local lease = redis.call('HGET', KEYS[2], 'lease')
if lease and lease ~= '' then
  return 0
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  return 0
end
local step = tonumber(ARGV[2])
if ttl <= step then
  redis.call('DEL', KEYS[1])
  return 2
end
redis.call('PEXPIRE', KEYS[1], ttl - step)
return 1
