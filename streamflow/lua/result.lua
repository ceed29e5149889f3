#!lua
-- Keep jobs' outcomes and settle their entries (acknowledge and delete), in one step, for the
-- entries this consumer still owns: a worker that lost its lease never writes a result, and a
-- job's result is there as soon as the job is gone from the stream. Used instead of the batched
-- settle.lua for the jobs whose outcome is kept (the worker's acker sends both); not
-- allow-oom, as it writes.
-- KEYS[1] role stream, KEYS[1 + i] the result key of the i-th entry
-- ARGV[1] group, ARGV[2] consumer, then per entry i: entry id, result JSON, TTL ms
-- Returns the ids that were refused (no longer pending, or owned by another consumer).
-- Owner check (split_owned) and deletion (ack_delete) are fence.lua, which scripts.py prepends.
local stream, group = KEYS[1], ARGV[1]
local ids, at = {}, {}
for i = 1, #KEYS - 1 do
  local id = ARGV[3 * i]
  ids[i] = id
  at[id] = i
end
local owned, refused = split_owned(stream, group, ARGV[2], ids)
for _, id in ipairs(owned) do
  local i = at[id]
  redis.call('SET', KEYS[1 + i], ARGV[3 * i + 1], 'PX', ARGV[3 * i + 2])
end
ack_delete(stream, group, owned)
return refused
