-- Take unique locks for a running attempt (the execution side), fenced by its lease.
-- Each lock is taken when it is free or already held by this job (re-entrant: a
-- retried or reclaimed job re-enters its own lock, and the TTL is refreshed); all
-- or nothing.
-- KEYS: job, lock_1 .. lock_n
-- ARGV: job_id, token, ttl_ms
-- Returns {1} taken, {0} lost lease (nothing changed),
--         {2, holder_job_id, lock_key} a lock is held by another job (nothing changed).
local job, job_id = KEYS[1], ARGV[1]
if redis.call('HGET', job, 'lease') ~= ARGV[2] then
  return {0}
end
for i = 2, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  if holder and holder ~= job_id then
    return {2, holder, KEYS[i]}
  end
end
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], job_id, 'PX', ARGV[3])
end
return {1}
