-- Fire one tick of a cron schedule: compare-and-set the schedule's state and write the
-- tick's job (enqueue.lua, included as the function `enqueue`, under the tick's
-- deterministic id) in one step, in one slot: the state lives in the partition the
-- schedule's jobs go to. A tick is handled once: the state's `last` only moves forward;
-- `worker` names the worker that handled it.
-- KEYS: state, then enqueue.lua's KEYS (job, stream, delayed, seq, idle, lock_1 .. n)
-- ARGV: tick_ms, max_drift_ms, name, worker, clock, publish_command, events_channel,
--       then enqueue.lua's ARGV (job_id first)
-- Returns {verdict, value, server_ms, enqueue reply...}; server_ms is the server's
-- TIME (without the runner's clock offset), value the state's `last` before the call
-- ('done', 'paused', 'fired') or "now" by the runner's clock ('early', 'late'):
--   'done'    this tick (or a later one) was handled already: nothing written
--   'early'   the tick is not due yet by the server's clock: nothing written
--   'late'    the tick is more than max_drift_ms late: nothing written
--   'paused'  the schedule is paused: the tick is handled (skipped), no job written
--   'fired'   the tick is handled and enqueue ran; its reply follows: {0, ''} the job
--             existed, {1, entry_or_member} written, {2, holder, lock} a lock is held
local state = KEYS[1]
local tick, drift = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local server = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now = now_ms(ARGV[5])
-- `last` is a handled tick: a whole number of ms, never after now; allow
-- FUTURE_SLACK_MS for clocks that differ (taskrunner.cron.schedule.FUTURE_SLACK)
local FUTURE_SLACK_MS = 60000
local raw = redis.call('HGET', state, 'last')
local last = raw and string.match(raw, '^%d+$') and tonumber(raw)
if not last or last > now + FUTURE_SLACK_MS then
  last = 0  -- missing or hostile (NaN, '1e3', far ahead): as if no tick was handled
end
if last >= tick then
  return {'done', string.format('%d', last), server}
end
if tick > now then
  return {'early', string.format('%d', now), server}
end
if now - tick > drift then
  return {'late', string.format('%d', now), server}
end
local verdict, reply = 'paused', {}
if redis.call('HGET', state, 'paused') ~= '1' then
  verdict = 'fired'
  reply = enqueue({unpack(KEYS, 2)}, {unpack(ARGV, 8)})
end
redis.call('HSET', state, 'last', string.format('%d', tick), 'worker', ARGV[4])
if verdict == 'fired' and reply[1] ~= 2 then
  redis.call('HSET', state, 'fired', string.format('%d', tick), 'job', ARGV[8])
end
redis.call(ARGV[6], ARGV[7], 'cron ' .. ARGV[3] .. ' ' .. string.format('%d', tick) .. ' ' .. ARGV[4])
local out = {verdict, string.format('%d', last), server}
for i = 1, #reply do
  out[#out + 1] = reply[i]
end
return out
