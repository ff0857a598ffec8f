-- Ask for the job's final status to be published on its done channel (commit.lua and
-- abort.lua publish only for watched jobs), and read its state, in one step. The
-- caller subscribes to the done channel first, so it either sees a final status here
-- or gets the message.
-- KEYS: job
-- Returns false (no such job) or {status, task, result, error, progress, next, relayed}
-- (next and relayed: a chain step's follow-ups, and whether the relay wrote them).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return false
end
redis.call('HSET', KEYS[1], 'watch', '1')
return redis.call('HMGET', KEYS[1], 'status', 'task', 'result', 'error', 'progress', 'next',
  'relayed')
