-- Start an attempt of the job behind a stream entry that this consumer holds:
-- take a new lease (fencing token) and count the attempt.
-- KEYS: stream, job
-- ARGV: group, consumer, entry_id, token, now_ms, max_deliveries
-- Returns {'gone'} the entry is no longer this consumer's (reclaimed elsewhere),
--         {'missing'} the entry has no job hash (acked and deleted: dead-letter it),
--         {'final', status} the job is already final (acked and deleted),
--         {'aborted'} the job was aborted before it started (acked and deleted),
--         {'ok' | 'poison', task, args, attempts, locks, deliveries, reclaimed}
local stream, job = KEYS[1], KEYS[2]
local group, consumer, entry = ARGV[1], ARGV[2], ARGV[3]

local pending = redis.call('XPENDING', stream, group, entry, entry, 1, consumer)
if #pending == 0 then
  return {'gone'}
end
local deliveries = pending[1][4]
local h = redis.call('HMGET', job, 'status', 'task', 'args', 'locks', 'abort')
local status = h[1]
if not status then
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
  return {'missing'}
end
if status ~= 'queued' and status ~= 'running' then
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
  return {'final', status}
end
local reclaimed = 0
if status == 'running' then
  reclaimed = 1
  redis.call('HINCRBY', job, 'reclaims', 1)
end
redis.call('HSET', job, 'status', 'running', 'lease', ARGV[4], 'worker', consumer,
  'started', ARGV[5], 'entry', entry)
local attempts = redis.call('HINCRBY', job, 'attempts', 1)
local verdict = 'ok'
if deliveries > tonumber(ARGV[6]) then
  verdict = 'poison'
elseif h[5] then
  verdict = 'abort'
end
return {verdict, h[2], h[3], attempts, h[4] or '', deliveries, reclaimed}
