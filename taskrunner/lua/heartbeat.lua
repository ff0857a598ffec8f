-- Renew one running job's lease: reset its stream entry's idle time and renew
-- the unique locks it holds, only while the lease is still the caller's, so a
-- late heartbeat never takes an entry back from the worker that reclaimed it.
-- A lock's TTL is never shortened (a retry may have extended it past lock_ttl).
-- KEYS: stream, job, lock_1 .. lock_n
-- ARGV: group, consumer, entry_id, token, lock_ttl_ms, job_id
-- Returns 1 renewed, 0 lost lease, 2 renewed but an abort was requested.
local stream, job = KEYS[1], KEYS[2]
local h = redis.call('HMGET', job, 'lease', 'abort')
if h[1] ~= ARGV[4] then
  return 0
end
redis.call('XCLAIM', stream, ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  for i = 3, #KEYS do
    local ok, owner = pcall(redis.call, 'GET', KEYS[i])  -- a hostile key of another type
    if ok and owner == ARGV[6] and redis.call('PTTL', KEYS[i]) < ttl then
      redis.call('PEXPIRE', KEYS[i], ttl)
    end
  end
end
if h[2] then
  return 2
end
return 1
