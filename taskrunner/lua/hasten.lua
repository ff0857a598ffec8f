-- Wake a job that waits in the delayed set for a concurrency slot: make it due now.
-- KEYS: job, delayed
-- ARGV: clock, publish_command, events_channel
-- A job whose refused attempt is still being committed (status running) is flagged
-- instead: commit.lua's reschedule then makes it due at once.
-- Returns 1 woken (due now, flagged, or already queued), 0 not waiting (no such job,
-- final, or not in the delayed set).
local job, delayed = KEYS[1], KEYS[2]
local h = redis.call('HMGET', job, 'status', 'member')
if h[1] == 'scheduled' and h[2] then
  local score = redis.call('ZSCORE', delayed, h[2])
  if not score then
    return 0
  end
  local now = now_ms(ARGV[1])
  if tonumber(score) > now then
    redis.call('ZADD', delayed, 'XX', now, h[2])
    redis.call('HSET', job, 'due', now)
    redis.call(ARGV[2], ARGV[3], 'due')
  end
  return 1
end
if h[1] == 'running' then
  redis.call('HSET', job, 'hasten', '1')
  return 1
end
if h[1] == 'queued' then
  return 1
end
return 0
