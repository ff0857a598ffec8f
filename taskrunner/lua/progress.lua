-- Store a running attempt's progress, fenced by its lease (a stale copy cannot
-- overwrite it), and tell whoever follows the job.
-- KEYS: job
-- ARGV: token, value_json, done_channel, publish_command
-- Returns 1 stored, 0 lost lease.
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'progress', ARGV[2])
if redis.call('HEXISTS', KEYS[1], 'watch') == 1 then
  redis.call(ARGV[4], ARGV[3], 'progress')
end
return 1
