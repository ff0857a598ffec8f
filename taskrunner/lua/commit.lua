-- Record what happens next to a job and acknowledge its entry, in one step,
-- only while the caller's lease (fencing token) is still the job's lease.
-- KEYS: stream, job, delayed, dead, seq, failed, idle, index, [outbox], lock_1 .. lock_n
--       index: the finished-job index (sorted set by finish time) of the outcome's
--       status: succeeded, rejected, or aborted for any other outcome (the status an
--       abort request turns a retry, reschedule or hand-back into)
-- ARGV: group, entry_id, token, job_id, outcome, payload, ttl_ms, delay_ms,
--       done_channel, events_channel, publish_command, clock_offset_ms, level, lock_ttl_ms,
--       [follow]
--       follow '1' (only for a job with follow-ups, a chain step: taskrunner.chain):
--       KEYS[9] is the partition's outbox, and a succeeded job's id joins it, scored by
--       the commit time, in this same step; the relay (worker/relay.py) later writes its
--       follow-up. Without it the script does nothing more than before.
-- outcome: succeeded | failed | aborted | rejected | dead   (final)
--          retry | reschedule                               (back to the delayed set;
--                                       a reschedule is due at once if the job was
--                                       flagged 'hasten' meanwhile: see hasten.lua)
--          handback                                         (back to the stream at once)
--          A job whose abort was requested while it ran ends as aborted instead of
--          going back for another attempt.
-- Returns 1 committed (or already committed by this same token: a repeat after a
-- lost reply changes nothing), 0 lost lease (nothing changed).
-- Hostile keys fail no commit half way: a retry or reschedule whose delayed set is of
-- another type, a hand-back whose stream takes no new entry, a chain step whose outbox
-- is of another type are dead-lettered with that reason; a seq that is no counter
-- schedules with sequence 0; a hostile count field ('reschedules', 'attempts') counts
-- as 0 or its whole part (add_count, _hostile.lua).
-- The token is spent by the commit ('lease' cleared, kept as 'committed'), so at most
-- one attempt of a job commits an outcome. The final status is published on the job's
-- done channel only when someone waits for it (watch.lua set 'watch').
-- A succeeded, aborted or rejected job joins its status's index (failed and dead jobs
-- have theirs): the admin API lists and counts from them (add_to_index, _settle.lua:
-- one ZADD per job alone, one per index and batch in a batch; a hostile index key fails
-- no commit). The trim to result_ttl runs once per batch and index (trim_due; a lone
-- commit: one in ~32, when now is a multiple of 32 ms; readers skip members older than
-- result_ttl anyway) and removes at most TRIM_MAX members, as many as a batch adds at
-- most, so a backlog (a queue quiet for a day, a shorter result_ttl) is worked off and
-- never stalls a commit. The entry is deleted at once alone, at the batch's end in a
-- batch (settle_entry, _settle.lua; drop_entries, _batch.lua).
local stream, job, delayed, dead, seq = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, entry, token, job_id, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local publish = ARGV[11]
local FIRST_LOCK = 9
local outbox = nil
if ARGV[15] then
  outbox = KEYS[9]
  FIRST_LOCK = 10
end

local h = redis.call('HMGET', job, 'lease', 'committed', 'abort', 'watch')
if h[1] ~= token then
  if h[2] == token then
    return 1
  end
  return 0
end
if h[3] and (outcome == 'retry' or outcome == 'reschedule' or outcome == 'handback') then
  outcome = 'aborted'  -- aborted while it ran: it ends now, not after the next wait
end
local payload = ARGV[6]

-- Hostile keys (of another type, written by hand or damaged) must fail no commit half
-- way through its writes: what a non-success path needs is read (pcall) before the
-- entry is settled. A delayed set that is no sorted set: the job is dead-lettered with
-- that reason instead of waiting there. Dead letters that are no sorted set: the job is
-- recorded dead all the same (its status and reason) but is in no dead set, so its
-- hash expires after result_ttl (below); leaving the entry pending instead would run
-- the task again at every stale-entry reclaim.
local first = nil
if outcome == 'retry' or outcome == 'reschedule' then
  local ok, read = pcall(redis.call, 'ZRANGE', delayed, 0, 0, 'WITHSCORES')
  if ok then
    first = read
  else
    payload = dead_reason('its ' .. outcome .. ' cannot be scheduled', delayed, read)
    outcome = 'dead'
  end
end
-- XACK now (the first write: Redis does not refuse it when out of memory, and lets the
-- writes after it through), the entry deleted now or, in a batch, at its end
settle_entry(stream, group, entry)
local now = now_ms(ARGV[12])
local stamp = now_text(ARGV[12])

if outcome == 'retry' or outcome == 'reschedule' then
  local delay = tonumber(ARGV[8])
  if outcome == 'reschedule' and redis.call('HDEL', job, 'hasten') == 1 then
    delay = 0  -- a limit slot freed while this refused attempt was committing (hasten.lua)
  end
  local due = now + delay
  -- a seq that is no counter (hostile, or at its largest) orders nothing: the job is
  -- scheduled with sequence 0 (equal due times then lose their FIFO order)
  local ok, n = pcall(redis.call, 'INCR', seq)
  if not ok then
    n = 0
  end
  local member = string.format('%016x', n) .. ':' .. ARGV[13] .. ':' .. job_id
  redis.call('ZADD', delayed, due, member)
  if outcome == 'retry' then
    redis.call('HSET', job, 'status', 'scheduled', 'member', member, 'due', due, 'lease', '',
      'committed', token, 'error', payload)
  else
    redis.call('HSET', job, 'status', 'scheduled', 'member', member, 'due', due, 'lease', '',
      'committed', token)
    add_count(job, 'reschedules', 1)
    add_count(job, 'attempts', -1)
  end
  -- the job's locks outlive the wait for its next attempt; never shorten one
  local ttl = delay + tonumber(ARGV[14])
  for i = FIRST_LOCK, #KEYS do
    local ok, owner = pcall(redis.call, 'GET', KEYS[i])  -- a key of another type: not a
    if ok and owner == job_id and redis.call('PTTL', KEYS[i]) < ttl then  -- lock of its
      redis.call('PEXPIRE', KEYS[i], ttl)
    end
  end
  if #first == 0 or due < tonumber(first[2]) then
    redis.call(publish, ARGV[10], 'due')
  end
  return 1
end
if outcome == 'handback' then
  -- a stream that takes no new entry (hostile: its last id is the largest there is)
  local ok, new_entry = pcall(redis.call, 'XADD', stream, '*', 'job', job_id)
  if ok then
    redis.call('HSET', job, 'status', 'queued', 'entry', new_entry, 'lease', '',
      'committed', token)
    add_count(job, 'attempts', -1)
    if redis.call('DEL', KEYS[7]) == 1 then
      redis.call(publish, ARGV[10], ready_event(job_id))
    end
    return 1
  end
  payload = dead_reason('it cannot be handed back', stream, new_entry)
  outcome = 'dead'
end

if outcome == 'succeeded' and outbox then
  -- a chain step: its follow-up is written from the outbox; an outbox that is no sorted
  -- set (hostile) cannot take it, so the step is dead-lettered with that reason (its
  -- result kept): retried from there once the key is mended, it runs on
  local ok, err = pcall(redis.call, 'ZADD', outbox, now, job_id)
  if not ok then
    redis.call('HSET', job, 'result', ARGV[6])
    payload = dead_reason('its follow-up cannot be recorded', outbox, err)
    outcome = 'dead'
  end
end
if outcome == 'succeeded' then
  redis.call('HSET', job, 'status', outcome, 'finished', stamp, 'lease', '', 'committed', token,
    'result', payload)
elseif payload ~= '' then
  redis.call('HSET', job, 'status', outcome, 'finished', stamp, 'lease', '', 'committed', token,
    'error', payload)
else
  redis.call('HSET', job, 'status', outcome, 'finished', stamp, 'lease', '', 'committed', token)
end
if outcome ~= 'dead' or not pcall(redis.call, 'ZADD', dead, now, job_id) then
  redis.call('PEXPIRE', job, ARGV[7])  -- a dead job in no dead set (hostile) too
end
local index = nil
if outcome == 'failed' then
  index = KEYS[6]  -- failed jobs for `taskrunner info`: kept as long as their hash
elseif outcome ~= 'dead' then
  index = KEYS[8]
end
if index then
  add_to_index(index, stamp, job_id, now, tonumber(ARGV[7]))
end
for i = FIRST_LOCK, #KEYS do
  -- a lock key of another type (hostile) is no lock of the job's: it fails no commit
  -- halfway through its writes
  local ok, owner = pcall(redis.call, 'GET', KEYS[i])
  if ok and owner == job_id then
    redis.call('DEL', KEYS[i])
  end
end
if h[4] then
  redis.call(publish, ARGV[9], outcome)
end
return 1
