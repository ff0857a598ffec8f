-- One page of dead letters, oldest first, after a cursor (reads only).
-- KEYS: dead
-- ARGV: after_id ('' from the start), after_score_ms, count
-- The page starts after the cursor's id. If that id left the dead letters meanwhile
-- (retried, deleted, trimmed), it starts after the ids that died before the cursor's
-- time, skipping up to 100 ids of that same time that sort at or before it: a page
-- may then repeat an id, never skip one.
-- Returns a flat list: id_1, score_1, ..., id_n, score_n (n <= count).
local dead = KEYS[1]
local count = tonumber(ARGV[3])
if ARGV[1] == '' then
  return redis.call('ZRANGE', dead, 0, count - 1, 'WITHSCORES')
end
local rank = redis.call('ZRANK', dead, ARGV[1])
if rank then
  return redis.call('ZRANGE', dead, rank + 1, rank + count, 'WITHSCORES')
end
local start = redis.call('ZCOUNT', dead, '-inf', '(' .. ARGV[2])
local rows = redis.call('ZRANGE', dead, start, start + count + 99, 'WITHSCORES')
local out = {}
local skipping = true
for i = 1, #rows, 2 do
  if skipping and tonumber(rows[i + 1]) == tonumber(ARGV[2]) and rows[i] <= ARGV[1] then
    -- the same time, at or before the cursor: already listed
  else
    skipping = false
    if #out < 2 * count then
      out[#out + 1] = rows[i]
      out[#out + 1] = rows[i + 1]
    end
  end
end
return out
