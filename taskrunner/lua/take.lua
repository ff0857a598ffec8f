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
for _, e in ipairs(out) do
  local f = e[3]
  if #f == 2 and f[1] == 'job' and f[2] == job_id then
    local ok, reply = pcall(claim, {KEYS[e[1]], job},
      {ARGV[1], ARGV[2], e[2], ARGV[na - 2], ARGV[na - 1], ARGV[na], ARGV[5]})
    if ok then
      e[4] = reply
    end
    break
  end
end
return out
