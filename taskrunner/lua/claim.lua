-- Start an attempt of the job behind a stream entry that this consumer holds:
-- take a new lease (fencing token) and count the attempt.
-- KEYS: stream, job
-- ARGV: group, consumer, entry_id, token, max_deliveries, max_payload, clock_offset_ms
-- Returns {'gone'} the entry is no longer this consumer's,
--         {'missing'} the entry has no job hash (the caller dead-letters the entry with
--                  orphan.lua; it stays pending until then, so a crash loses nothing),
--         {'invalid', status} the job hash has no known status (dead-lettered likewise),
--         {'wrongtype'} the job's key is not a hash (dead-lettered likewise),
--         {'final', status} the job is already final (acked and deleted),
--         {'stray', live_entry} the job is live under another entry (exactly that id,
--                  in this stream, {'job', job_id}, unsettled): this one is a duplicate
--                  and must not start a second copy (acked and deleted),
--         {verdict, task, args, attempts, locks, reclaims, meta_json, ready_ms, reclaimed}
--         with verdict 'ok', 'poison' (its worker died under it while it ran alone
--         max_deliveries times), 'abort' (abort requested) or 'toolarge' (its arguments
--         exceed max_payload bytes: they are not returned).
local stream, job = KEYS[1], KEYS[2]
local group, consumer, entry = ARGV[1], ARGV[2], ARGV[3]

-- (numbers passed to redis.call are formatted with printf('%.17g') on every call:
-- counts go as strings)
if #redis.call('XPENDING', stream, group, entry, entry, '1', consumer) == 0 then
  return {'gone'}
end
-- the arguments come in the same HMGET only when they are small enough: a hostile
-- field of any size is never copied into the script
local size = redis.pcall('HSTRLEN', job, 'args')
if type(size) == 'table' then  -- WRONGTYPE: the job's key is not a hash (hostile)
  return {'wrongtype'}
end
local small = size <= tonumber(ARGV[6])
local h = redis.call('HMGET', job, 'status', 'task', 'locks', 'abort', 'entry', 'attempts',
  'reclaims', 'meta', 'enqueued', 'due', 'crashes', 'reclaimed', small and 'args' or 'task')
local status = h[1]
if not status then
  return {'missing'}
end
if status ~= 'queued' and status ~= 'running' and status ~= 'scheduled' then
  if status == 'succeeded' or status == 'failed' or status == 'aborted'
      or status == 'rejected' or status == 'dead' then
    redis.call('XACK', stream, group, entry)
    redis.call('XDEL', stream, entry)
    return {'final', status}
  end
  return {'invalid', status}
end
-- Another entry named: is it the job's live entry? Only if it is exactly that id in
-- this stream (an id without its sequence part is a range to XRANGE: not taken), is
-- {'job', job_id} as the write paths make it (job_id: the entry read names it, as the
-- worker read it: its last 'job' field), and is not settled (pending, or not read by
-- the group yet); then the entry read is a stray duplicate, whatever else it carries.
-- A hostile 'entry' field (junk, an id of no entry, of one settled already or of
-- another job's) is not trusted: the entry read is claimed, and the field corrected
-- below. (Inline, not a function: the common path, the entry read named, creates no
-- closure.)
local elsewhere = false
if status ~= 'scheduled' and h[5] and h[5] ~= entry then
  repeat
    local named = h[5]
    local ok, found = pcall(redis.call, 'XRANGE', stream, named, named)  -- junk: an error
    if not ok or #found ~= 1 or found[1][1] ~= named then
      break
    end
    local mine = redis.call('XRANGE', stream, entry, entry)[1]
    local job_id = nil
    for i = 1, mine and #mine[2] - 1 or 0, 2 do
      if mine[2][i] == 'job' then
        job_id = mine[2][i + 1]
      end
    end
    local other = found[1][2]
    if not job_id or #other ~= 2 or other[1] ~= 'job' or other[2] ~= job_id then
      break
    end
    if #redis.call('XPENDING', stream, group, named, named, 1) > 0 then
      elsewhere = true
      break
    end
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
      local name, last
      for k = 1, #g, 2 do
        if g[k] == 'name' then name = g[k + 1] end
        if g[k] == 'last-delivered-id' then last = g[k + 1] end
      end
      if name == group and last then  -- unread: after the group's last delivered id
        local read, after = pcall(redis.call, 'XRANGE', stream, '(' .. last, named, 'COUNT', 1)
        elsewhere = read and #after > 0
      end
    end
  until true
end
if status == 'scheduled' or elsewhere then
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
  return {'stray', h[5] or ''}
end

local verdict, args = 'ok', ''
if (tonumber(h[11]) or 0) >= tonumber(ARGV[5]) then
  verdict = 'poison'
elseif h[4] then
  verdict = 'abort'
elseif not small then
  verdict = 'toolarge'
else
  args = h[13] or ''
end
-- counts as whole numbers: a hostile field ('nan', '1e300', '3.5') counts as 0 or
-- its whole part, so what is written back is an integer Redis and Python both read
local attempts = tonumber(h[6]) or 0
if not (attempts >= 0 and attempts < 9007199254740992) then  -- false for NaN too
  attempts = 0
end
attempts = math.floor(attempts)
local reclaims = tonumber(h[7]) or 0
if not (reclaims >= 0 and reclaims < 9007199254740992) then
  reclaims = 0
end
reclaims = math.floor(reclaims)
local ready = math.max(tonumber(h[9]) or 0, tonumber(h[10]) or 0)
if status == 'running' and redis.call('HGET', job, 'lease') == ARGV[4] then
  -- this very claim again (its reply was lost with the connection and the call sent
  -- again): the same answer, and nothing is counted twice
  return {verdict, h[2] or '', args, attempts, h[3] or '', reclaims, h[8] or '', ready,
    h[12] == ARGV[4] and 1 or 0}
end
attempts = attempts + 1
local attempts_text = string.format('%d', attempts)
-- 'reclaimed': '1' when requeue.lua put the job back from a stale worker; a claim that
-- takes a job over keeps its own token there, so that a repeat of it answers the same
local reclaimed = 0
if status == 'running' then  -- the same entry delivered again: its attempt was cut short
  reclaims = reclaims + 1
  reclaimed = 1
elseif h[12] == '1' then
  reclaimed = 1
elseif h[12] then  -- an earlier attempt's
  redis.call('HDEL', job, 'reclaimed')
end
-- fields that did not change are not written (each is a search of the hash): 'entry'
-- when the job moved to this entry, 'reclaims' (absent: none) when this is one
local started = now_text(ARGV[7])
if h[5] == entry and reclaimed == 0 then
  redis.call('HSET', job, 'status', 'running', 'lease', ARGV[4], 'worker', consumer,
    'started', started, 'attempts', attempts_text)
else
  local set = {'status', 'running', 'lease', ARGV[4], 'worker', consumer,
    'started', started, 'attempts', attempts_text}
  if h[5] ~= entry then
    set[#set + 1] = 'entry'
    set[#set + 1] = entry
  end
  if status == 'running' then
    set[#set + 1] = 'reclaims'
    set[#set + 1] = string.format('%d', reclaims)
  end
  if reclaimed == 1 then
    set[#set + 1] = 'reclaimed'
    set[#set + 1] = ARGV[4]
  end
  redis.call('HSET', job, unpack(set))
end
return {verdict, h[2] or '', args, attempts, h[3] or '', reclaims, h[8] or '', ready,
  reclaimed}
