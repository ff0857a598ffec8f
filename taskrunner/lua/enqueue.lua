-- Write a new job: its hash, its stream entry (due now) or delayed-set member
-- (due later), and any unique locks it takes at enqueue, in one step.
-- KEYS: job, stream, delayed, seq, lock_1 .. lock_n
-- ARGV: job_id, task, args, queue, now_ms, due_ms, events_channel, meta_json, n_locks,
--       lock_ttl_ms_1 .. n
-- Returns {0, ""} job exists already (idempotent), {1, entry_or_member} written,
--         {2, holder_job_id, lock_key} a lock is held by another job.
local job, stream, delayed, seq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_id, now, due = ARGV[1], tonumber(ARGV[5]), tonumber(ARGV[6])
local n_locks = tonumber(ARGV[9])

if redis.call('EXISTS', job) == 1 then
  return {0, ''}
end
for i = 1, n_locks do
  local holder = redis.call('GET', KEYS[4 + i])
  if holder and holder ~= job_id then
    return {2, holder, KEYS[4 + i]}
  end
end
local locks = {}
for i = 1, n_locks do
  redis.call('SET', KEYS[4 + i], job_id, 'PX', ARGV[9 + i])
  locks[i] = KEYS[4 + i]
end

local function write(status, place, where)
  redis.call('HSET', job, 'status', status, place, where, 'task', ARGV[2], 'args', ARGV[3],
    'queue', ARGV[4], 'enqueued', ARGV[5], 'due', ARGV[6], 'attempts', 0,
    'locks', table.concat(locks, ' '))
  if ARGV[8] ~= '' then
    redis.call('HSET', job, 'meta', ARGV[8])
  end
end
if due > now then
  local member = string.format('%016x', redis.call('INCR', seq)) .. ':' .. job_id
  redis.call('ZADD', delayed, due, member)
  write('scheduled', 'member', member)
  redis.call('PUBLISH', ARGV[7], 'due')
  return {1, member}
end
local entry = redis.call('XADD', stream, '*', 'job', job_id)
write('queued', 'entry', entry)
return {1, entry}
