-- Pause or resume one partition of a queue. While its 'paused' key exists, fetch.lua
-- reads nothing from the partition; enqueues, promotions and reclaims go on. The
-- partition's workers are told ('pause' or 'resume' on its events channel; a resume
-- wakes their readers), also when nothing changed (a repeat re-sends a lost message).
-- KEYS: paused
-- ARGV: 'pause' | 'resume', publish_command, events_channel, clock_offset_ms
-- Returns 1 changed, 0 it already was so.
local changed
if ARGV[1] == 'pause' then
  changed = redis.call('SET', KEYS[1], now_ms(ARGV[4]), 'NX') and 1 or 0
else
  changed = redis.call('DEL', KEYS[1])
end
redis.call(ARGV[2], ARGV[3], ARGV[1])
return changed
