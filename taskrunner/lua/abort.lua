-- Abort a job. A scheduled or queued job is removed and finished as aborted at
-- once; a running one is flagged and its worker told over pub/sub (the worker's
-- heartbeat also sees the flag, as a fallback).
-- A job aborted here joins the aborted index (and up to 100 of its members older than
-- result_ttl leave it), as commit.lua does for the jobs it finishes.
-- KEYS: job, stream, delayed, aborted, lock_1 .. lock_n
-- ARGV: job_id, ttl_ms, done_channel, events_channel, group, publish_command,
--       clock_offset_ms
-- Returns the status after the call: 'aborted', 'aborting', a final status, or 'missing'.
local job, stream, delayed, aborted = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local h = redis.call('HMGET', job, 'status', 'entry', 'member', 'watch')
local status = h[1]
if not status then
  return 'missing'
end
local now = now_ms(ARGV[7])
if status == 'running' then
  redis.call('HSET', job, 'abort', now)
  redis.call(ARGV[6], ARGV[4], 'abort ' .. ARGV[1])
  return 'aborting'
end
if status == 'scheduled' then
  redis.call('ZREM', delayed, h[3])
elseif status == 'queued' then
  redis.call('XACK', stream, ARGV[5], h[2])
  redis.call('XDEL', stream, h[2])
else
  return status
end
redis.call('HSET', job, 'status', 'aborted', 'finished', now, 'abort', now)
redis.call('PEXPIRE', job, ARGV[2])
redis.call('ZADD', aborted, now, ARGV[1])
local stale = redis.call('ZCOUNT', aborted, '-inf', now - tonumber(ARGV[2]))
if stale > 0 then
  redis.call('ZREMRANGEBYRANK', aborted, 0, math.min(stale, 100) - 1)
end
for i = 5, #KEYS do
  local ok, owner = pcall(redis.call, 'GET', KEYS[i])  -- a hostile key of another type
  if ok and owner == ARGV[1] then
    redis.call('DEL', KEYS[i])
  end
end
if h[4] then
  redis.call(ARGV[6], ARGV[3], 'aborted')
end
return 'aborted'
