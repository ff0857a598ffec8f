-- Dead-letter a stream entry that names no usable job (written by hand, its job hash
-- gone, or a hash without a known status), and acknowledge it, in one step. The entry
-- stays pending until then, so a crash before this script loses nothing; an entry no
-- longer pending (another worker already did this) is left alone. Whatever the hash
-- already holds is kept; only the status, the finish time and the error are set. A job
-- key that is not a hash (hostile) is replaced by the dead letter's record.
-- KEYS: stream, job, dead
-- ARGV: group, entry_id, job_id, task, queue, error_json, clock_offset_ms
-- Returns 1 dead-lettered, 0 the entry was not pending any more.
local stream, job, dead = KEYS[1], KEYS[2], KEYS[3]
local pending = redis.call('XPENDING', stream, ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 then
  return 0
end
-- dead letters that are no sorted set (hostile): nothing is written, the entry stays
-- pending (the error is reported; the next pass tries again)
if type(redis.pcall('ZSCORE', dead, ARGV[3])) == 'table' then
  return redis.error_reply('the dead letters ' .. dead .. ' are not a sorted set; the entry ' ..
    'stays pending')
end
local now = now_ms(ARGV[7])
-- (HEXISTS, not TYPE: the documented ACL user runs only the commands taskrunner needs)
if type(redis.pcall('HEXISTS', job, 'status')) == 'table' then  -- WRONGTYPE: hostile
  redis.call('DEL', job)
end
redis.call('HSETNX', job, 'task', ARGV[4])
redis.call('HSETNX', job, 'queue', ARGV[5])
redis.call('HSETNX', job, 'enqueued', now)
redis.call('HSET', job, 'status', 'dead', 'finished', now, 'lease', '', 'error', ARGV[6])
redis.call('ZADD', dead, now, ARGV[3])
redis.call('XACK', stream, ARGV[1], ARGV[2])
redis.call('XDEL', stream, ARGV[2])
return 1
