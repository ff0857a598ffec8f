-- Run a finished job again under the same id (the admin API's retry): from failed,
-- aborted, rejected or dead; a succeeded job is never run again and a live one is left
-- alone. The job goes back into its own priority level's stream in its partition as a
-- fresh job: attempts from 0, no last outcome, lease, progress, or crash and reclaim
-- history (as revive.lua clears them), due now by the server's clock, no expiry, out
-- of the finished-job indexes and the dead letters. Workers that found the partition
-- drained are woken ('ready'), as after an enqueue.
-- KEYS: job, stream (of the job's level), failed, aborted, rejected, dead, idle
-- ARGV: job_id, publish_command, events_channel, clock_offset_ms
-- Returns {1, entry} queued again, {0, status} left alone (its status), {0, 'missing'}.
local job = KEYS[1]
local status = redis.call('HGET', job, 'status')
if not status then
  return {0, 'missing'}
end
if status ~= 'failed' and status ~= 'aborted' and status ~= 'rejected' and status ~= 'dead' then
  return {0, status}
end
for i = 3, 6 do
  redis.call('ZREM', KEYS[i], ARGV[1])
end
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
redis.call('HSET', job, 'status', 'queued', 'entry', entry, 'attempts', 0, 'lease', '',
  'due', now_ms(ARGV[4]))
redis.call('HDEL', job, 'abort', 'finished', 'result', 'error', 'member', 'started', 'worker',
  'progress', 'crashes', 'reclaims', 'alone', 'reclaimed')
redis.call('HINCRBY', job, 'reruns', 1)
redis.call('PERSIST', job)
if redis.call('DEL', KEYS[7]) == 1 then
  redis.call(ARGV[2], ARGV[3], ready_event(ARGV[1]))
end
return {1, entry}
