-- The fence: a prelude, not a script. scripts.Scripts puts it after the shebang of every script
-- that settles or renews an entry (Scripts.FENCED). Any consumer may XACK or XCLAIM any pending
-- id, so such a script first checks, in the same atomic step, that this consumer still owns the
-- entry: a worker that lost its lease must not settle an entry another worker is now running.
-- Every key it is given is one of the calling script's KEYS. A missing group raises NOGROUP.
-- It also holds ack_delete: how settle.lua removes a batch it has acknowledged.

-- The pending row {id, owner, idle ms, delivery count} of `id` if `me` owns it, else nil.
local function owned_entry(stream, group, me, id)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if p[1] and p[1][2] == me then
    return p[1]
  end
  return nil
end

-- Whether entry id `a` comes before `b` in the stream; `da`, `db`: where their '-' is.
-- Ids are 'ms-seq' in decimal without leading zeros, so text order is id order between ids of
-- the same shape, and fewer digits mean a smaller number.
local function id_before(a, da, b, db)
  if da ~= db then
    return da < db
  end
  if #a == #b or string.sub(a, 1, da) ~= string.sub(b, 1, db) then
    return a < b
  end
  return #a < #b
end

-- The first and last of `ids` in stream order.
local function id_bounds(ids)
  local first, last = ids[1], ids[1]
  local df = string.find(first, '-', 1, true)
  local dl = df
  for i = 2, #ids do
    local id = ids[i]
    local d = string.find(id, '-', 1, true)
    if id_before(id, d, first, df) then
      first, df = id, d
    elseif id_before(last, dl, id, d) then
      last, dl = id, d
    end
  end
  return first, last
end

-- Splits `ids` into those pending under `me` (idle below `max_idle` ms when given), in stream
-- order, and the others, in the order given. One XPENDING of this consumer's entries between
-- the first and the last of `ids` (paged), instead of one call per id or a scan of everything
-- it holds: with prefetch that is about a thousand entries, most of them outside the batch.
local function split_owned(stream, group, me, ids, max_idle)
  local owned, others, wanted = {}, {}, {}
  if #ids == 0 then
    return owned, others
  end
  for _, id in ipairs(ids) do
    wanted[id] = true
  end
  local start, last = id_bounds(ids)
  local page = 1000
  while true do
    local rows = redis.call('XPENDING', stream, group, start, last, page, me)
    for _, row in ipairs(rows) do
      local id = row[1]
      if wanted[id] and (not max_idle or row[3] < max_idle) then
        owned[#owned + 1] = id
        wanted[id] = false
      end
    end
    if #rows < page then
      break
    end
    start = '(' .. rows[#rows][1]
  end
  if #owned < #ids then
    for _, id in ipairs(ids) do
      if wanted[id] then
        others[#others + 1] = id
        wanted[id] = false
      end
    end
  end
  return owned, others
end

-- Acknowledges `ids` (entries this consumer owns, in stream order) and deletes them: an
-- acknowledged entry is never needed again, and XACK alone leaves the stream growing forever.
-- Every entry before the oldest one still pending in the group (or, with none pending, before
-- the last of `ids`) was delivered (groups start at 0) and acknowledged, so one XTRIM MINID
-- deletes those, whole stream nodes at a time; XDEL, which looks each id up and walks its
-- node, is left for the ids from there on (finished out of order, or behind a long job).
local function ack_delete(stream, group, ids)
  if #ids == 0 then
    return
  end
  redis.call('XACK', stream, group, unpack(ids))
  local oldest = redis.call('XPENDING', stream, group, '-', '+', 1)[1]
  local edge = oldest and oldest[1] or ids[#ids]
  local de = string.find(edge, '-', 1, true)
  redis.call('XTRIM', stream, 'MINID', edge)
  local first = #ids + 1
  while first > 1 do
    local id = ids[first - 1]
    if id_before(id, string.find(id, '-', 1, true), edge, de) then
      break
    end
    first = first - 1
  end
  if first <= #ids then
    redis.call('XDEL', stream, unpack(ids, first))
  end
end
