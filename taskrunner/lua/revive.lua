-- Put a dead-lettered job back on its queue: same id, attempts reset, the
-- dead-letter reason cleared (a new delivery count comes with the new entry), into its
-- own priority level's stream (the default level's when it has none or a level this
-- runner does not declare). Workers that found the partition drained are woken.
-- KEYS: dead, job, idle, stream_1 .. stream_L (the partition's level streams)
-- ARGV: job_id, default_index, publish_command, events_channel, level_1 .. level_L
-- A member whose job is not dead any more (its hash expired and the id was enqueued
-- again, so it may be queued or running) is a stale dead letter: it leaves the dead
-- letters and its job is left alone, so a job never gets a second entry this way.
-- Returns 1 revived, 0 not a dead letter here.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
if redis.call('HGET', KEYS[2], 'status') ~= 'dead' then
  return 0
end
local level = redis.call('HGET', KEYS[2], 'level')
local stream = KEYS[3 + tonumber(ARGV[2])]
for i = 5, #ARGV do
  if ARGV[i] == level then
    stream = KEYS[i - 1]
  end
end
local entry = redis.call('XADD', stream, '*', 'job', ARGV[1])
redis.call('HSET', KEYS[2], 'status', 'queued', 'entry', entry, 'attempts', 0, 'lease', '')
redis.call('HDEL', KEYS[2], 'abort', 'finished', 'result', 'error', 'crashes', 'reclaims',
  'alone', 'reclaimed')
redis.call('PERSIST', KEYS[2])
if redis.call('DEL', KEYS[3]) == 1 then
  redis.call(ARGV[3], ARGV[4], ready_event(ARGV[1]))
end
return 1
