-- The batch driver: runs one(KEYS, ARGV) per call of a batch (see _BATCH_DRIVER in
-- taskrunner/scripts.py for the layouts), then the writes the calls deferred to its
-- end. Appended to a script's body wrapped in one(); _clock.lua and _settle.lua come first.

-- the two numbers of a stream id as Redis writes it (decimal, no leading zero), or nil
local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)%-(%d+)$')
  if not ms or (#ms > 1 and string.byte(ms) == 48) or (#seq > 1 and string.byte(seq) == 48) then
    return nil
  end
  return ms, seq
end

-- a < b for two stream ids as Redis writes them
local function id_less(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  if #am ~= #bm then
    return #am < #bm
  end
  if am ~= bm then
    return am < bm
  end
  if #as ~= #bs then
    return #as < #bs
  end
  return as < bs
end

local function delete_ids(stream, ids)
  for first = 1, #ids, 500 do
    redis.call('XDEL', stream, unpack(ids, first, math.min(first + 499, #ids)))
  end
end

-- Delete a batch's settled entries. Every entry below both the newest one this batch
-- acknowledged and the group's oldest pending one was delivered and acknowledged, and
-- every acknowledged entry is deleted by the script that acknowledges it: one XTRIM
-- MINID removes them (at most a listpack node's walk), instead of one search per id.
-- The rest (above the oldest pending entry: jobs that finished while an older one
-- still runs) go by XDEL. Only ids this batch's XACK found pending set the bound, so
-- an id never delivered cannot trim a queued entry.
local function drop_entries(stream, done)
  if done.mixed then  -- calls of several groups on one stream: the bound is one group's
    return delete_ids(stream, done.ids)
  end
  local top
  for _, id in ipairs(done.delivered) do
    if not id_parts(id) then
      return delete_ids(stream, done.ids)
    end
    if not top or id_less(top, id) then
      top = id
    end
  end
  if not top then
    return delete_ids(stream, done.ids)
  end
  local oldest = redis.call('XPENDING', stream, done.group, '-', '+', 1)[1]
  local bound = top
  if oldest and id_parts(oldest[1]) and id_less(oldest[1], bound) then
    bound = oldest[1]
  end
  if not pcall(redis.call, 'XTRIM', stream, 'MINID', bound) then
    return delete_ids(stream, done.ids)  -- an ACL without XTRIM: as before, per id
  end
  local rest = {}
  for _, id in ipairs(done.ids) do
    if not id_parts(id) or not id_less(id, bound) then
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
