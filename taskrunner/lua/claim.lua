-- Start an attempt of the job behind a stream entry that this consumer holds:
-- take a new lease (fencing token) and count the attempt.
-- KEYS: stream, job
-- ARGV: group, consumer, entry_id, token, now_ms, max_deliveries
-- Returns {'gone'} the entry is no longer this consumer's (reclaimed elsewhere, or
--                  acknowledged by an abort),
--         {'missing'} the entry has no job hash: the caller dead-letters it and
--                  acknowledges it in one transaction (left pending until then, so a
--                  crash in between loses nothing),
--         {'final', status} the job is already final (acked and deleted),
--         {'stray', live_entry} the job is live under another entry: this one is a
--                  duplicate (written by hand) and must not start a second copy
--                  (acked and deleted),
--         {'ok' | 'poison' | 'abort', task, args, attempts, locks, deliveries, reclaimed,
--          meta_json, ready_ms (when it became runnable: max(enqueued, due))}
local stream, job = KEYS[1], KEYS[2]
local group, consumer, entry = ARGV[1], ARGV[2], ARGV[3]

local pending = redis.call('XPENDING', stream, group, entry, entry, 1, consumer)
if #pending == 0 then
  return {'gone'}
end
local deliveries = pending[1][4]
local h = redis.call('HMGET', job, 'status', 'task', 'args', 'locks', 'abort', 'entry',
  'attempts', 'reclaims', 'meta', 'enqueued', 'due')
local status = h[1]
if not status then
  return {'missing'}
end
if status ~= 'queued' and status ~= 'running' then
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
  return {'final', status}
end
if h[6] and h[6] ~= entry then
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
  return {'stray', h[6]}
end
local reclaimed = 0
local attempts = (tonumber(h[7]) or 0) + 1
if status == 'running' then
  reclaimed = 1
  redis.call('HSET', job, 'reclaims', (tonumber(h[8]) or 0) + 1)
end
redis.call('HSET', job, 'status', 'running', 'lease', ARGV[4], 'worker', consumer,
  'started', ARGV[5], 'entry', entry, 'attempts', attempts)
local verdict = 'ok'
if deliveries > tonumber(ARGV[6]) then
  verdict = 'poison'
elseif h[5] then
  verdict = 'abort'
end
local ready = math.max(tonumber(h[10]) or 0, tonumber(h[11]) or 0)
return {verdict, h[2], h[3], attempts, h[4] or '', deliveries, reclaimed, h[9] or '', ready}
