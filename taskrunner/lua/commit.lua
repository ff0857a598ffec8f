-- Record what happens next to a job and acknowledge its entry, in one step,
-- only while the caller's lease (fencing token) is still the job's lease.
-- KEYS: stream, job, delayed, dead, seq, failed, lock_1 .. lock_n
-- ARGV: group, entry_id, token, job_id, outcome, now_ms, payload, ttl_ms,
--       due_ms, done_channel, events_channel
-- outcome: succeeded | failed | aborted | rejected | dead   (final)
--          retry | reschedule                               (back to the delayed set)
--          handback                                         (back to the stream at once)
--          A job whose abort was requested while it ran ends as aborted instead of
--          going back for another attempt.
-- Returns 1 committed (or already committed by this same token: a repeat after a
-- lost reply changes nothing), 0 lost lease (nothing changed).
-- The token is spent by the commit ('lease' cleared, kept as 'committed'), so at most
-- one attempt of a job commits an outcome.
local stream, job, delayed, dead, seq = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, entry, job_id, outcome = ARGV[1], ARGV[2], ARGV[4], ARGV[5]

local h = redis.call('HMGET', job, 'lease', 'committed', 'abort')
if h[1] ~= ARGV[3] then
  if h[2] == ARGV[3] then
    return 1
  end
  return 0
end
if h[3] and (outcome == 'retry' or outcome == 'reschedule' or outcome == 'handback') then
  outcome = 'aborted'  -- aborted while it ran: it ends now, not after the next wait
end
redis.call('XACK', stream, group, entry)
redis.call('XDEL', stream, entry)

if outcome == 'retry' or outcome == 'reschedule' then
  local member = string.format('%016x', redis.call('INCR', seq)) .. ':' .. job_id
  redis.call('ZADD', delayed, ARGV[9], member)
  redis.call('HSET', job, 'status', 'scheduled', 'member', member, 'due', ARGV[9], 'lease', '',
    'committed', ARGV[3])
  if outcome == 'retry' then
    redis.call('HSET', job, 'error', ARGV[7])
  else
    redis.call('HINCRBY', job, 'reschedules', 1)
    redis.call('HINCRBY', job, 'attempts', -1)
  end
  redis.call('PUBLISH', ARGV[11], 'due')
  return 1
end
if outcome == 'handback' then
  local new_entry = redis.call('XADD', stream, '*', 'job', job_id)
  redis.call('HSET', job, 'status', 'queued', 'entry', new_entry, 'lease', '',
    'committed', ARGV[3])
  redis.call('HINCRBY', job, 'attempts', -1)
  return 1
end

local detail = 'error'
if outcome == 'succeeded' then
  detail = 'result'
end
if outcome == 'succeeded' or ARGV[7] ~= '' then
  redis.call('HSET', job, 'status', outcome, 'finished', ARGV[6], 'lease', '',
    'committed', ARGV[3], detail, ARGV[7])
else
  redis.call('HSET', job, 'status', outcome, 'finished', ARGV[6], 'lease', '',
    'committed', ARGV[3])
end
if outcome == 'dead' then
  redis.call('ZADD', dead, ARGV[6], job_id)
else
  redis.call('PEXPIRE', job, ARGV[8])
end
if outcome == 'failed' then
  -- failed jobs for `taskrunner info`: kept as long as their hash (result_ttl)
  redis.call('ZADD', KEYS[6], ARGV[6], job_id)
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', tonumber(ARGV[6]) - tonumber(ARGV[8]))
end
for i = 7, #KEYS do
  if redis.call('GET', KEYS[i]) == job_id then
    redis.call('DEL', KEYS[i])
  end
end
redis.call('PUBLISH', ARGV[10], outcome)
return 1
