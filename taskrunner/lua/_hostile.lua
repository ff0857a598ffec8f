-- Helpers for hostile data on a script's failure paths: prepended to the scripts that
-- use them (taskrunner/scripts.py), once per run or batch.

-- an error caught by pcall as text
local function error_text(err)
  if type(err) == 'table' then
    err = err.err
  end
  return tostring(err)
end

-- the error JSON of a job dead-lettered because `key` cannot be written: `what`, then
-- the key and Redis's error
local function dead_reason(what, key, err)
  return cjson.encode({type = 'DeadLetter', traceback = '',
    message = what .. ': ' .. key .. ' cannot be written (' .. error_text(err) .. ')'})
end

-- HINCRBY that a hostile field ('nan', '1e300', '3.5') does not fail: such a field
-- counts as 0 or its whole part (as claim.lua reads counts), and the sum, never below
-- 0, is written back as a whole number
local function add_count(key, field, delta)
  if pcall(redis.call, 'HINCRBY', key, field, delta) then
    return
  end
  local n = tonumber(redis.call('HGET', key, field)) or 0
  if not (n >= 0 and n < 9007199254740992) then  -- false for NaN too
    n = 0
  end
  redis.call('HSET', key, field, string.format('%d', math.max(0, math.floor(n) + delta)))
end
