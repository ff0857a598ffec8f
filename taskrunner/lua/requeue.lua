-- Put a stale entry back on its stream as a new entry: the reclaim of a job whose
-- worker stopped heartbeating (crashed, stalled, cut off). The caller took the entry
-- over with XAUTOCLAIM (min idle time = stale_after) into its own name; this checks it
-- still holds it (a live worker's heartbeat may have taken it back since), spends the
-- old lease (so the stale worker can commit nothing), and counts the takeover. A crash
-- of an attempt that ran alone (isolate.lua) is charged to the job ('crashes').
-- KEYS: stream, job, idle
-- ARGV: group, consumer, entry_id, job_id, publish_command, events_channel
-- Returns 1 requeued, 0 not held by the caller any more, -1 no job hash (the caller
-- dead-letters the entry), 2 a stray or finished entry (acked and deleted).
local stream, job, idle = KEYS[1], KEYS[2], KEYS[3]
local group, consumer, entry = ARGV[1], ARGV[2], ARGV[3]
if #redis.call('XPENDING', stream, group, entry, entry, 1, consumer) == 0 then
  return 0
end
local h = redis.pcall('HMGET', job, 'status', 'entry', 'lease', 'alone', 'reclaims', 'crashes')
if h.err or not h[1] then  -- no job hash, or a key of another type (hostile)
  return -1
end
if h[2] ~= entry or (h[1] ~= 'running' and h[1] ~= 'queued') then
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
  return 2
end
local new_entry = redis.call('XADD', stream, '*', 'job', ARGV[4])
if h[1] == 'running' then
  local crashes = tonumber(h[6]) or 0
  if h[4] and h[4] ~= '' and h[4] == h[3] then
    crashes = crashes + 1
  end
  redis.call('HSET', job, 'status', 'queued', 'entry', new_entry, 'lease', '', 'alone', '',
    'reclaims', (tonumber(h[5]) or 0) + 1, 'crashes', crashes, 'reclaimed', '1')
else
  redis.call('HSET', job, 'entry', new_entry)  -- read but never claimed: hand it on
end
redis.call('XACK', stream, group, entry)
redis.call('XDEL', stream, entry)
if redis.call('DEL', idle) == 1 then
  redis.call(ARGV[5], ARGV[6], ready_event(ARGV[4]))
end
return 1
