-- Move due members of the delayed set into the stream. The caller read the
-- members with ZRANGEBYSCORE; ZREM decides who moves each one, so two racing
-- promoters never both enqueue a job, and a crash before this script loses nothing.
-- KEYS: delayed, stream, job_1 .. job_n
-- ARGV: member_1 .. member_n
-- Returns the number of jobs moved.
local delayed, stream = KEYS[1], KEYS[2]
local moved = 0
for i = 1, #ARGV do
  local member = ARGV[i]
  if redis.call('ZREM', delayed, member) == 1 then
    local job = KEYS[2 + i]
    if redis.call('HGET', job, 'status') == 'scheduled' then
      local job_id = string.sub(member, 18)
      local entry = redis.call('XADD', stream, '*', 'job', job_id)
      redis.call('HSET', job, 'status', 'queued', 'entry', entry)
      redis.call('HDEL', job, 'member')
      moved = moved + 1
    end
  end
end
return moved
