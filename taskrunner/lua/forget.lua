-- Delete dead letters for good: each named job leaves the dead letters and its hash is
-- deleted, if it is still dead (a job revived meanwhile is left alone).
-- KEYS: dead, job_1 .. job_n
-- ARGV: job_id_1 .. job_id_n
-- Returns how many left the dead letters.
local removed = 0
for i = 1, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    if redis.call('HGET', KEYS[i + 1], 'status') == 'dead' then
      redis.call('DEL', KEYS[i + 1])
    end
    removed = removed + 1
  end
end
return removed
