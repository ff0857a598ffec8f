-- Remove dead letters and their job hashes: one bounded batch of ids.
-- KEYS: dead, job_1 .. job_n        (job_i is the hash of id_i)
-- ARGV: cutoff_ms, keep, id_1 .. id_n
-- An id is removed when it is still in the dead letters and either died at or before
-- cutoff_ms, or the dead letters hold more than `keep` ids (keep = -1 removes every
-- given id). Its job hash goes too, if it is still a dead job's (UNLINK: a large hash
-- is freed off the main thread).
-- Returns the number of ids removed.
local dead = KEYS[1]
local cutoff = tonumber(ARGV[1])
local keep = tonumber(ARGV[2])
local left = redis.call('ZCARD', dead)
local removed = 0
for i = 3, #ARGV do
  local score = redis.call('ZSCORE', dead, ARGV[i])
  if score and (tonumber(score) <= cutoff or left > keep) then
    redis.call('ZREM', dead, ARGV[i])
    left = left - 1
    removed = removed + 1
    if redis.call('HGET', KEYS[i - 1], 'status') == 'dead' then
      redis.call('UNLINK', KEYS[i - 1])
    end
  end
end
return removed
