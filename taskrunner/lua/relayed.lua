-- The relay's second step for one job of a partition's outbox (worker/relay.py): the
-- follow-up was written (in its own slot, by enqueue.lua under its deterministic id,
-- so a relay repeated after a crash writes nothing there), or it cannot be written
-- (a malformed follow-up spec: hostile data) and is dead-lettered here instead. Either
-- way the job leaves the outbox, and its hash records it in 'relayed' (`ok`, or
-- `dead <dead letter id>`), published on its done channel when someone waits for it.
-- Only the caller whose ZREM removes the job does anything: two relays racing, or a
-- relay repeated, change nothing more.
-- KEYS: outbox, job, dead, dead_job
-- ARGV: job_id, verdict ('ok' | 'dead'), done_channel, publish_command, clock_offset_ms,
--       dead_id, task, queue, error_json
-- Returns 1 done, 0 the job was no longer in the outbox.
local outbox, job, dead, dead_job = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('ZREM', outbox, ARGV[1]) == 0 then
  return 0
end
local value = 'ok'
if ARGV[2] == 'dead' then
  local now = now_ms(ARGV[5])
  -- (HEXISTS, not TYPE: the documented ACL user runs only the commands taskrunner needs)
  if type(redis.pcall('HEXISTS', dead_job, 'status')) == 'table' then  -- WRONGTYPE
    redis.call('DEL', dead_job)
  end
  if redis.call('EXISTS', dead_job) == 0 then
    redis.call('HSET', dead_job, 'task', ARGV[7], 'queue', ARGV[8], 'args', '{}',
      'enqueued', now, 'attempts', 0)
  end
  redis.call('HSET', dead_job, 'status', 'dead', 'finished', now, 'error', ARGV[9])
  redis.call('ZADD', dead, now, ARGV[6])
  value = 'dead ' .. ARGV[6]
end
local watched = redis.pcall('HEXISTS', job, 'watch')
if type(watched) == 'number' and redis.call('EXISTS', job) == 1 then  -- else gone or hostile
  redis.call('HSET', job, 'relayed', value)
  if watched == 1 then
    redis.call(ARGV[4], ARGV[3], 'relayed')
  end
end
return 1
