-- Abort a job. A scheduled or queued job is removed and finished as aborted at
-- once; a running one is flagged and its worker told over pub/sub (the worker's
-- heartbeat also sees the flag, as a fallback).
-- KEYS: job, stream, delayed, lock_1 .. lock_n
-- ARGV: job_id, now_ms, ttl_ms, done_channel, events_channel, group
-- Returns the status after the call: 'aborted', 'aborting', a final status, or 'missing'.
local job, stream, delayed = KEYS[1], KEYS[2], KEYS[3]
local h = redis.call('HMGET', job, 'status', 'entry', 'member')
local status = h[1]
if not status then
  return 'missing'
end
if status == 'running' then
  redis.call('HSET', job, 'abort', ARGV[2])
  redis.call('PUBLISH', ARGV[5], 'abort ' .. ARGV[1])
  return 'aborting'
end
if status == 'scheduled' then
  redis.call('ZREM', delayed, h[3])
elseif status == 'queued' then
  redis.call('XACK', stream, ARGV[6], h[2])
  redis.call('XDEL', stream, h[2])
else
  return status
end
redis.call('HSET', job, 'status', 'aborted', 'finished', ARGV[2], 'abort', ARGV[2])
redis.call('PEXPIRE', job, ARGV[3])
for i = 4, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
  end
end
redis.call('PUBLISH', ARGV[4], 'aborted')
return 'aborted'
