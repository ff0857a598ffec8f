-- Dead-letter a stream entry that names no job (written by hand, or its job hash is
-- gone), and acknowledge it, in one step. The entry stays pending until then, so a
-- crash before this script loses nothing; an entry no longer pending (another
-- worker already did this) is left alone.
-- KEYS: stream, job, dead
-- ARGV: group, entry_id, job_id, task, queue, now_ms, error_json
-- Returns 1 dead-lettered, 0 the entry was not pending any more.
local stream, job, dead = KEYS[1], KEYS[2], KEYS[3]
local pending = redis.call('XPENDING', stream, ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 then
  return 0
end
redis.call('HSET', job, 'status', 'dead', 'task', ARGV[4], 'queue', ARGV[5],
  'enqueued', ARGV[6], 'finished', ARGV[6], 'attempts', 0, 'args', '', 'locks', '',
  'error', ARGV[7])
redis.call('ZADD', dead, ARGV[6], ARGV[3])
redis.call('XACK', stream, ARGV[1], ARGV[2])
redis.call('XDEL', stream, ARGV[2])
return 1
