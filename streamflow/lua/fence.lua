-- The fence: a prelude, not a script. streams.Scripts puts it after the shebang of every script
-- that settles or renews an entry (Scripts.FENCED). Any consumer may XACK or XCLAIM any pending
-- id, so such a script first checks, in the same atomic step, that this consumer still owns the
-- entry: a worker that lost its lease must not settle an entry another worker is now running.
-- Every key it is given is one of the calling script's KEYS. A missing group raises NOGROUP.

-- The pending row {id, owner, idle ms, delivery count} of `id` if `me` owns it, else nil.
local function owned_entry(stream, group, me, id)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if p[1] and p[1][2] == me then
    return p[1]
  end
  return nil
end

-- The set of ids pending under `me` (idle below `max_idle` ms when given): one paged XPENDING
-- of this consumer's entries instead of one call per id. A consumer name belongs to one live
-- process, so that list holds only what this worker holds: a few dozen.
local function owned_ids(stream, group, me, max_idle)
  local mine, start, page = {}, '-', 1000
  while true do
    local rows = redis.call('XPENDING', stream, group, start, '+', page, me)
    for _, row in ipairs(rows) do
      if not max_idle or row[3] < max_idle then
        mine[row[1]] = true
      end
    end
    if #rows < page then
      return mine
    end
    start = '(' .. rows[#rows][1]
  end
end

-- Appends the ids of `ids` that are in `mine` to `owned`; returns the others, in order.
local function split_owned(mine, ids, owned)
  local others = {}
  for _, id in ipairs(ids) do
    if mine[id] then
      owned[#owned + 1] = id
    else
      others[#others + 1] = id
    end
  end
  return others
end
