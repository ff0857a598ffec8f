-- Read (and set) how many partitions a queue has: 'partitions' is what producers
-- spread new jobs over; 'max_partitions' is every partition that may hold jobs (workers
-- read them all, so lowering N strands nothing). Producers only read what is recorded
-- (unless configured with an explicit N); workers record what they use.
-- KEYS: meta
-- ARGV: wanted (0: keep what is recorded), default (used when nothing is recorded),
--       record (1: write what is used), limit (the most partitions a queue may have)
-- Returns {partitions, max_partitions}.
-- A recorded count that is not a whole number from 1 to the limit is hostile: it is
-- read as absent (and replaced when this call records), so no worker builds millions
-- of partitions from one bad field.
local limit = tonumber(ARGV[4])
local function count(value)
  local n = tonumber(value)
  if n and n >= 1 and n <= limit and n == math.floor(n) then
    return n
  end
  return nil
end
local h = redis.pcall('HMGET', KEYS[1], 'partitions', 'max_partitions')
local hostile = h.err ~= nil  -- the meta key holds another type: read as absent, kept
if hostile then
  h = {}
end
local current, most = count(h[1]), count(h[2]) or 0
local wanted = tonumber(ARGV[1])
if wanted > 0 then
  current = wanted
elseif not current then
  current = tonumber(ARGV[2])
end
if current > most then
  most = current
end
local changed = h[1] ~= tostring(current) or h[2] ~= tostring(most)
if changed and not hostile and (wanted > 0 or ARGV[3] == '1') then
  redis.call('HSET', KEYS[1], 'partitions', current, 'max_partitions', most)
end
return {current, most}
