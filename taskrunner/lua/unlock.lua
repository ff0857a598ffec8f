-- Release unique locks of a running attempt by compare-and-delete, fenced by its
-- lease, so neither a stale attempt nor another job's lock is ever freed. With
-- forget = 1 the keys are also dropped from the job's `locks` field (an
-- until_executing lock, released for good when the first attempt starts).
-- KEYS: job, lock_1 .. lock_n
-- ARGV: job_id, token, forget
-- Returns the number of locks deleted, or -1 lost lease (nothing changed).
local job, job_id = KEYS[1], ARGV[1]
if redis.call('HGET', job, 'lease') ~= ARGV[2] then
  return -1
end
local released = 0
local dropped = {}
for i = 2, #KEYS do
  dropped[KEYS[i]] = true
  local ok, owner = pcall(redis.call, 'GET', KEYS[i])  -- a hostile key of another type
  if ok and owner == job_id then
    redis.call('DEL', KEYS[i])
    released = released + 1
  end
end
if ARGV[3] == '1' then
  local kept = {}
  for key in string.gmatch(redis.call('HGET', job, 'locks') or '', '%S+') do
    if not dropped[key] then
      kept[#kept + 1] = key
    end
  end
  redis.call('HSET', job, 'locks', table.concat(kept, ' '))
end
return released
