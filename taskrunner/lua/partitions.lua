-- Read (and set) how many partitions a queue has: 'partitions' is what producers
-- spread new jobs over; 'max_partitions' is every partition that may hold jobs (workers
-- read them all, so lowering N strands nothing). Producers only read what is recorded
-- (unless configured with an explicit N); workers record what they use.
-- KEYS: meta
-- ARGV: wanted (0: keep what is recorded), default (used when nothing is recorded),
--       record (1: write what is used)
-- Returns {partitions, max_partitions}.
local h = redis.call('HMGET', KEYS[1], 'partitions', 'max_partitions')
local current, most = tonumber(h[1]), tonumber(h[2]) or 0
local wanted = tonumber(ARGV[1])
if wanted > 0 then
  current = wanted
elseif not current then
  current = tonumber(ARGV[2])
end
if current > most then
  most = current
end
local changed = tonumber(h[1]) ~= current or tonumber(h[2]) ~= most
if changed and (wanted > 0 or ARGV[3] == '1') then
  redis.call('HSET', KEYS[1], 'partitions', current, 'max_partitions', most)
end
return {current, most}
