-- Jobs finished per minute, counted in the finished-job indexes of one partition (read
-- only): ZCOUNT of each index over each minute, so the throughput chart needs no
-- counter on the commit path.
-- KEYS: index_1 .. index_k (sorted sets scored by finish time, ms)
-- ARGV: minutes, clock_offset_ms
-- Returns {first_minute, count(index_1, minute_1), .., count(index_1, minute_m),
--          count(index_2, minute_1), ..}: m = minutes, the last one the current minute
--          by the server's clock (minute = ms // 60000).
local m = tonumber(ARGV[1])
local first = math.floor(now_ms(ARGV[2]) / 60000) - m + 1
local out = {first}
for k = 1, #KEYS do
  for i = 0, m - 1 do
    local start = (first + i) * 60000
    out[#out + 1] = redis.call('ZCOUNT', KEYS[k], start, '(' .. (start + 60000))
  end
end
return out
