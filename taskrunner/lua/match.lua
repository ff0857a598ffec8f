-- Which candidates of a filtered listing match, decided on the server (read only): a
-- filter by task or priority may look at thousands of jobs for one page, and this way
-- only the matches' fields travel.
-- KEYS: job_1 .. job_n (one partition)
-- ARGV: status, task ('' = any), level ('' = any), default_level (a job without one)
-- Returns the positions (1-based) of the jobs whose hash has that status, task and level.
local found = {}
for i = 1, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'status', 'task', 'level')
  if h[1] == ARGV[1] and (ARGV[2] == '' or h[2] == ARGV[2])
      and (ARGV[3] == '' or (h[3] or ARGV[4]) == ARGV[3]) then
    found[#found + 1] = i
  end
end
return found
