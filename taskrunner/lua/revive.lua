-- Put a dead-lettered job back on its queue: same id, attempts reset, the
-- dead-letter reason cleared (a new delivery count comes with the new entry).
-- KEYS: dead, stream, job
-- ARGV: job_id
-- Returns 1 revived, 0 not in the dead letters.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
if redis.call('EXISTS', KEYS[3]) == 0 then
  return 0
end
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
redis.call('HSET', KEYS[3], 'status', 'queued', 'entry', entry, 'attempts', 0, 'lease', '')
redis.call('HDEL', KEYS[3], 'abort', 'finished', 'result', 'error', 'crashes', 'reclaims',
  'alone', 'reclaimed')
redis.call('PERSIST', KEYS[3])
return 1
