-- Helpers every script shares (taskrunner/scripts.py prepends this file to each).
local server_ms
local now_texts = {}

-- "now" in ms: the server's clock (TIME, read once per script run) plus the runner's
-- clock offset, or a frozen instant ('=<ms>', tests only: taskrunner.clock)
local function now_ms(clock)
  if string.sub(clock, 1, 1) == '=' then
    return tonumber(string.sub(clock, 2))
  end
  if not server_ms then
    local t = redis.call('TIME')
    server_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return server_ms + (tonumber(clock) or 0)
end

-- the same as a string, formatted once per run: Redis formats a number passed to
-- redis.call with printf('%.17g') on every call
local function now_text(clock)
  local text = now_texts[clock]
  if not text then
    text = string.format('%d', now_ms(clock))
    now_texts[clock] = text
  end
  return text
end

-- Acknowledge an entry at once; delete it at once (a lone run) or at the end of the
-- batch (done_entries is set by the batch driver, which calls drop_entries).
local done_entries
local function settle_entry(stream, group, entry)
  local acked = redis.call('XACK', stream, group, entry)
  if not done_entries then
    redis.call('XDEL', stream, entry)
    return
  end
  local done = done_entries[stream]
  if not done then
    done = {group = group, ids = {}, delivered = {}}
    done_entries[stream] = done
  end
  done.ids[#done.ids + 1] = entry
  if acked == 1 then
    done.delivered[#done.delivered + 1] = entry
  end
end

local function id_parts(id)
  return string.match(id, '^(%d+)%-(%d+)$')
end

-- a < b for two stream ids as Redis writes them (decimal, no leading zeros)
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

-- A finished job's member in an index: one ZADD per job alone, one per index and
-- batch in a batch (indexed is set by the batch driver, which adds them at its end).
local indexed
local function add_to_index(key, score, member)
  if not indexed then
    redis.call('ZADD', key, score, member)
    return
  end
  local members = indexed[key]
  if not members then
    members = {}
    indexed[key] = members
  end
  members[#members + 1] = score
  members[#members + 1] = member
end

-- whether a call should trim an index: once per run and key in a batch, else in
-- one run in ~32
local TRIM_MAX = @TRIM_MAX@
local trimmed = {}
local function trim_due(key, now)
  if trimmed[key] then
    return false
  end
  trimmed[key] = true
  return done_entries ~= nil or now % 32 == 0
end
