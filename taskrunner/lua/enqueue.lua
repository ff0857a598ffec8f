-- Write a new job: its hash, its stream entry (due now) or delayed-set member (due
-- later), and any unique locks it takes at enqueue, in one step. Times come from the
-- server's clock (TIME + the runner's clock offset): producers pass relative delays.
-- KEYS: job, stream (of the job's priority level), delayed, seq, idle, lock_1 .. lock_n
-- ARGV: job_id, task, args, queue, level, delay_ms, meta_json, events_channel,
--       publish_command, clock_offset_ms, next_json, lock_ttl_ms_1 .. n
--       next_json: the job's follow-ups (a chain, taskrunner.chain), stored as its
--       'next' field; '' for none
-- Returns {0, ""} job exists already (idempotent), {1, entry_or_member} written,
--         {2, holder_job_id, lock_key} a lock is held by another job.
local job, stream, delayed, seq, idle = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local job_id, level = ARGV[1], ARGV[5]
local delay = tonumber(ARGV[6])

if redis.call('EXISTS', job) == 1 then
  return {0, ''}
end
local locks = {}
for i = 6, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  if holder and holder ~= job_id then
    return {2, holder, KEYS[i]}
  end
  locks[#locks + 1] = KEYS[i]
end
-- The locks are written after the job (below, in each branch): a write that fails on
-- a hostile key (a stream, a delayed set of another type) fails before anything is
-- written, never leaving locks held for a job that does not exist.

local now = now_ms(ARGV[10])
-- times go as strings (a Lua number passed to redis.call is formatted with
-- printf('%.17g') on every call; now_text formats it once per run)
local fields = {'task', ARGV[2], 'args', ARGV[3], 'queue', ARGV[4], 'level', level,
  'enqueued', now_text(ARGV[10])}
if #locks > 0 then
  fields[#fields + 1] = 'locks'
  fields[#fields + 1] = table.concat(locks, ' ')
end
if ARGV[7] ~= '' then
  fields[#fields + 1] = 'meta'
  fields[#fields + 1] = ARGV[7]
end
if ARGV[11] ~= '' then
  fields[#fields + 1] = 'next'
  fields[#fields + 1] = ARGV[11]
end
if delay > 0 then
  local due = now + delay
  local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
  -- a seq that is no counter (hostile) orders nothing: sequence 0
  local ok, n = pcall(redis.call, 'INCR', seq)
  local member = string.format('%016x', ok and n or 0) .. ':' .. level .. ':' .. job_id
  redis.call('ZADD', delayed, due, member)
  redis.call('HSET', job, 'status', 'scheduled', 'member', member, 'due', due, unpack(fields))
  for i = 6, #KEYS do
    redis.call('SET', KEYS[i], job_id, 'PX', ARGV[6 + i])
  end
  if #first == 0 or due < tonumber(first[2]) then
    redis.call(ARGV[9], ARGV[8], 'due')
  end
  return {1, member}
end
local entry = redis.call('XADD', stream, '*', 'job', job_id)
redis.call('HSET', job, 'status', 'queued', 'entry', entry, unpack(fields))
for i = 6, #KEYS do
  redis.call('SET', KEYS[i], job_id, 'PX', ARGV[6 + i])
end
if redis.call('DEL', idle) == 1 then
  redis.call(ARGV[9], ARGV[8], ready_event(job_id))
end
return {1, entry}
