-- Settling entries and indexing finished jobs: prepended to the scripts that use
-- settle_entry or add_to_index, and to every batch (its driver, _batch.lua, does the
-- writes these defer).

-- Acknowledge an entry at once; delete it at once (a lone run) or at the end of the
-- batch (done_entries is set by the batch driver, lua/_batch.lua, which deletes them).
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
  elseif done.group ~= group then
    done.mixed = true
  end
  done.ids[#done.ids + 1] = entry
  if acked == 1 then
    done.delivered[#done.delivered + 1] = entry
  end
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

local function trim_index(key, before)
  local stale = redis.call('ZCOUNT', key, '-inf', before)
  if stale > 0 then
    redis.call('ZREMRANGEBYRANK', key, 0, math.min(stale, TRIM_MAX) - 1)
  end
end

-- A finished job joins an index (a listing for the admin API, scored by its finish
-- time 'stamp'), and members older than ttl_ms leave it, at most TRIM_MAX at a time
-- when trim_due. One ZADD per job alone, one per index and batch in a batch (indexed
-- is set by the batch driver, which adds them at its end). A hostile key (of another
-- type) fails no commit: the job is only left out of the listing.
local indexed
local function add_to_index(key, stamp, member, now, ttl_ms)
  if indexed then
    local members = indexed[key]
    if not members then
      members = {}
      indexed[key] = members
    end
    members[#members + 1] = stamp
    members[#members + 1] = member
  else
    pcall(redis.call, 'ZADD', key, stamp, member)
  end
  -- in a batch the trim runs before the batch's own members are added at its end: a
  -- member already stale then (ttl_ms <= 0) waits for the next trim, and readers skip
  -- stale members anyway
  if trim_due(key, now) then
    pcall(trim_index, key, now - ttl_ms)
  end
end
