-- fetch.lua, and claim.lua for one of the entries it read, in one run: the job a
-- "ready" event named (enqueue.lua names the job that woke a drained partition), so
-- the worker that the event woke starts that job one round trip sooner. The other
-- entries are claimed afterwards with claim.lua, as after fetch.lua. Only an entry
-- exactly as the write paths make it ({'job', job_id}) is claimed here: any other is
-- left to claim.lua, so the worker and this script never disagree on its job. A claim
-- that fails (a hostile job key) is left to claim.lua too: the entries read must reach
-- the worker whatever happens to one of them.
-- KEYS: fetch.lua's KEYS, then the named job's hash
-- ARGV: fetch.lua's ARGV, then the named job's id, token, max_deliveries, max_payload
-- Returns fetch.lua's reply, the named job's entry (when read) with claim.lua's reply
--         as its fourth element.
local nk, na = #KEYS, #ARGV
local job, job_id = KEYS[nk], ARGV[na - 3]
local out = fetch({unpack(KEYS, 1, nk - 1)}, {unpack(ARGV, 1, na - 4)})
if out[1] == 'paused' then
  return out
end
local claim_argv = {ARGV[1], ARGV[2], '', ARGV[na - 2], ARGV[na - 1], ARGV[na], ARGV[5]}
for _, e in ipairs(out) do
  local f = e[3]
  if #f == 2 and f[1] == 'job' and f[2] == job_id then
    claim_argv[3] = e[2]
    local ok, reply = pcall(claim, {KEYS[e[1]], job}, claim_argv)
    if ok then
      e[4] = reply
    end
    return out
  end
end
-- Not read now: most often another worker has it. But if this very call ran before
-- (its reply lost with the connection, the call sent again), the job is running
-- under this call's token, its entry this consumer's: give it back as read, with
-- claim.lua's answer to a repeat (the same one, nothing counted twice); else it would
-- wait for the stale-entry reclaim and count as a worker's death.
local ok, h = pcall(redis.call, 'HMGET', job, 'lease', 'entry')
if not ok or h[1] ~= ARGV[na - 2] or not h[2] then
  return out
end
claim_argv[3] = h[2]
for i = 1, nk - 3 do  -- the level streams (fetch.lua's KEYS: streams, idle, paused)
  local claimed, reply = pcall(claim, {KEYS[i], job}, claim_argv)
  if claimed and reply[1] ~= 'gone' then
    out[#out + 1] = {i, h[2], {'job', job_id}, reply}
    break
  end
end
return out
