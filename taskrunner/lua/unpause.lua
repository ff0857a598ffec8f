-- Resume a paused cron schedule (tr.crontab.resume): drop its 'paused' flag and, if it
-- was paused, record its latest tick at or before now as handled, so that no worker
-- runs late the ticks that fell while it was paused (workers that were away then would
-- otherwise fire those within max_drift). 'last' only moves forward, as in tick.lua;
-- one that cannot be a handled tick (no whole number, or more than FUTURE_SLACK_MS
-- after now) is overwritten. Paused means 'paused' is '1', as tick.lua reads it: any
-- other value (hostile) is dropped, and the schedule, which was not paused, keeps its
-- 'last' (its latest tick may still be due).
-- KEYS: state
-- ARGV: tick_ms (the latest tick at or before now; 0: none), now_ms
-- Returns 1 resumed, 0 it was not paused (nothing changed).
local state = KEYS[1]
local paused = redis.call('HGET', state, 'paused')
if not paused then
  return 0
end
redis.call('HDEL', state, 'paused')
if paused ~= '1' then
  return 0
end
local tick, now = tonumber(ARGV[1]), tonumber(ARGV[2])
local FUTURE_SLACK_MS = 60000
local raw = redis.call('HGET', state, 'last')
local last = raw and string.match(raw, '^%d+$') and tonumber(raw)
if tick > 0 and (not last or last < tick or last > now + FUTURE_SLACK_MS) then
  redis.call('HSET', state, 'last', string.format('%d', tick))
end
return 1
