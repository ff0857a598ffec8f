-- Move due members of the delayed set into their level's stream. The caller read the
-- members with ZRANGEBYSCORE using its estimate of the server's time; each member is
-- checked against the server's own clock here, so a caller whose clock runs ahead never
-- promotes a job early. ZREM decides who moves each one, so two racing promoters never
-- both enqueue a job, and a crash before this script loses nothing.
-- KEYS: delayed, idle, job_1 .. job_n, stream_1 .. stream_n
-- ARGV: clock_offset_ms, publish_command, events_channel, then member_i, job_id_i pairs
-- Returns the number of jobs moved.
local delayed, idle = KEYS[1], KEYS[2]
local n = (#ARGV - 3) / 2
local now = now_ms(ARGV[1])
local moved = 0
for i = 1, n do
  local member, job_id = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  local score = redis.call('ZSCORE', delayed, member)
  if score and tonumber(score) <= now and redis.call('ZREM', delayed, member) == 1 then
    local job = KEYS[2 + i]
    if redis.call('HGET', job, 'status') == 'scheduled' then
      -- a stream that takes no entry (hostile: another type, or its last id the largest
      -- there is): the member goes back, a minute later, rather than the job being lost
      local ok, entry = pcall(redis.call, 'XADD', KEYS[2 + n + i], '*', 'job', job_id)
      if ok then
        redis.call('HSET', job, 'status', 'queued', 'entry', entry)
        redis.call('HDEL', job, 'member')
        moved = moved + 1
      else
        redis.call('ZADD', delayed, now + 60000, member)
      end
    end
  end
end
if moved > 0 and redis.call('DEL', idle) == 1 then
  redis.call(ARGV[2], ARGV[3], 'ready')
end
return moved
