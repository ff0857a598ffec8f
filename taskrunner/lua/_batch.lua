-- The batch driver: runs one(KEYS, ARGV) per call of a batch (see _BATCH_DRIVER in
-- taskrunner/scripts.py for the layouts), then the writes the calls deferred to its
-- end. Appended to a script's body wrapped in one(); _clock.lua and _settle.lua come first.

-- whether a stream id as Redis writes it (decimal, no leading zero): a pattern match,
-- run once per batch at most (on the trim bound it picks itself)
local function canonical(id)
  local ms, seq = string.match(id, '^(%d+)%-(%d+)$')
  return ms ~= nil and not (#ms > 1 and string.byte(ms) == 48)
    and not (#seq > 1 and string.byte(seq) == 48)
end

-- id < bound, where bound is a stream id as Redis writes it and bound_dash the position
-- of its '-'. Cheap (a plain find, no pattern; a substring only when the millisecond
-- parts have as many digits and the lengths differ), and never wrong towards "below"
-- for another spelling Redis accepts: leading zeros and spaces only make an id look
-- larger, and an id without a '-', or with anything but a digit after it (Redis reads
-- '5--1' as a huge sequence number), is never below. An id it calls not below is
-- deleted by itself, which is always safe.
local function below(id, bound, bound_dash)
  local dash = string.find(id, '-', 1, true)
  if not dash or (string.byte(id, dash + 1) or 0) < 48 then
    return false
  end
  if dash ~= bound_dash then
    return dash < bound_dash
  end
  if #id == #bound then
    return id < bound
  end
  local ms, bound_ms = string.sub(id, 1, dash), string.sub(bound, 1, dash)
  if ms ~= bound_ms then
    return ms < bound_ms
  end
  return #id < #bound
end

local function delete_ids(stream, ids)
  for first = 1, #ids, 500 do
    redis.call('XDEL', stream, unpack(ids, first, math.min(first + 499, #ids)))
  end
end

-- The trim bound of a batch that acknowledged the ids 'delivered' (non-empty): the
-- group's oldest pending entry, or with none pending the newest id acknowledged; nil
-- when that id is not spelled as Redis writes it. A stream has one group, created at
-- id 0 and read only with '>' (no SETID, NOACK or XCLAIM FORCE), and a group delivers
-- in order: every entry below its oldest pending one was delivered and is no longer
-- pending, so it is settled (its job's outcome recorded, or the entry a stray, an
-- orphan or gone), and whatever lies below the bound may go.
local function trim_bound(stream, group, delivered)
  local oldest = redis.call('XPENDING', stream, group, '-', '+', '1')[1]
  if oldest then
    return oldest[1]
  end
  local top, top_dash = delivered[1], string.find(delivered[1], '-', 1, true)
  for i = 2, #delivered do
    local id = delivered[i]
    if top_dash and not below(id, top, top_dash) then
      top, top_dash = id, string.find(id, '-', 1, true)
    end
  end
  if top_dash and canonical(top) then
    return top
  end
  return nil
end

-- Delete a batch's settled entries: one XTRIM MINID removes those below the trim
-- bound (at most a listpack node's walk), instead of one search per id, and the rest
-- (above the group's oldest pending entry: jobs that finished while an older one still
-- runs) go by XDEL. Only a batch that acknowledged a pending entry trims, so a batch of
-- ids never delivered cannot trim a queued entry.
local function drop_entries(stream, done)
  if done.mixed or #done.delivered == 0 then  -- mixed: several groups on one stream
    return delete_ids(stream, done.ids)
  end
  local bound = trim_bound(stream, done.group, done.delivered)
  if not bound or not pcall(redis.call, 'XTRIM', stream, 'MINID', bound) then
    return delete_ids(stream, done.ids)  -- or an ACL without XTRIM: as before, per id
  end
  local bound_dash = string.find(bound, '-', 1, true)
  local rest = {}
  for _, id in ipairs(done.ids) do
    if not below(id, bound, bound_dash) then
      rest[#rest + 1] = id
    end
  end
  delete_ids(stream, rest)
end

local out = {}
done_entries = {}
indexed = {}
local function call(i, k, a)
  local ok, reply = pcall(one, k, a)
  if ok then
    out[i] = reply
  else
    out[i] = {err = tostring(type(reply) == 'table' and reply.err or reply)}
  end
end
-- The template of a shared-layout batch: a table with the shared values of 'pattern'
-- (read from 'values' from 'index' on) in place, the positions that vary, and the
-- index of the first value after the shared ones.
local function template(pattern, values, index)
  local t, varying = {}, {}
  for j = 1, #pattern do
    t[j] = ''
    if string.byte(pattern, j) == 115 then  -- 's'
      t[j] = values[index]
      index = index + 1
    else
      varying[#varying + 1] = j
    end
  end
  return t, varying, index
end

-- fill the varying positions of 't' from 'values', from 'index' on: the next index
local function fill(t, varying, values, index)
  for v = 1, #varying do
    t[varying[v]] = values[index]
    index = index + 1
  end
  return index
end

if ARGV[1] == 'u' then
  local n = tonumber(ARGV[2])
  local k, kv, ki = template(ARGV[3], KEYS, 1)
  local a, av, ai = template(ARGV[4], ARGV, 5)
  for i = 1, n do
    ki = fill(k, kv, KEYS, ki)
    ai = fill(a, av, ARGV, ai)
    call(i, k, a)
  end
else
  local n = tonumber(ARGV[1])
  local ki, ai = 1, 2 + 2 * n
  for i = 1, n do
    local nk, na = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
    call(i, {unpack(KEYS, ki, ki + nk - 1)}, {unpack(ARGV, ai, ai + na - 1)})
    ki = ki + nk
    ai = ai + na
  end
end
for key, members in pairs(indexed) do
  for first = 1, #members, 500 do
    pcall(redis.call, 'ZADD', key, unpack(members, first, math.min(first + 499, #members)))
  end
end
for stream, done in pairs(done_entries) do
  pcall(drop_entries, stream, done)
end
return out
