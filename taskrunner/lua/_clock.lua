-- The scripts' clock: prepended to every script that uses now_ms or now_text
-- (taskrunner/scripts.py).
local server_ms
local ms_clock, ms_value = false, nil  -- false: no clock argument is cached
local now_clock, now_string = false, nil

-- "now" in ms: the server's clock (TIME, read once per script run) plus the runner's
-- clock offset, or a frozen instant ('=<ms>', tests only: taskrunner.clock); worked
-- out once per run and clock (every call of a batch passes the same one)
local function now_ms(clock)
  if clock == ms_clock then
    return ms_value
  end
  if string.sub(clock, 1, 1) == '=' then
    ms_value = tonumber(string.sub(clock, 2))
  else
    if not server_ms then
      local t = redis.call('TIME')
      server_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    ms_value = server_ms + (tonumber(clock) or 0)
  end
  ms_clock = clock
  return ms_value
end

-- the same as a string, formatted once per run: Redis formats a number passed to
-- redis.call with printf('%.17g') on every call
local function now_text(clock)
  if clock ~= now_clock then
    now_clock, now_string = clock, string.format('%d', now_ms(clock))
  end
  return now_string
end
