#!lua
-- Keep jobs' outcomes and settle their entries (acknowledge and delete), in one step, for the
-- entries this consumer still owns: a worker that lost its lease never writes a result, and a
-- job's result is there as soon as the job is gone from the stream. Used instead of the batched
-- settle.lua only for jobs whose outcome is kept; not allow-oom, as it writes.
-- KEYS[1] role stream, KEYS[1 + i] the result key of the i-th entry
-- ARGV[1] group, ARGV[2] consumer, then per entry i: entry id, result JSON, TTL ms
-- Returns the ids that were refused (no longer pending, or owned by another consumer).
-- Owner check (owned_entry, owned_ids, split_owned) is fence.lua, which streams.py prepends.
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local owned, refused = {}, {}
for i = 1, #KEYS - 1 do
  local at = 3 * i
  local id = ARGV[at]
  -- One XPENDING per id, not the consumer's whole pending list: a batch here is a few dozen
  -- entries, while a worker reading ahead holds a thousand.
  if owned_entry(stream, group, me, id) then
    redis.call('SET', KEYS[1 + i], ARGV[at + 1], 'PX', ARGV[at + 2])
    owned[#owned + 1] = id
  else
    refused[#refused + 1] = id
  end
end
if #owned > 0 then
  redis.call('XACK', stream, group, unpack(owned))
  redis.call('XDEL', stream, unpack(owned))
end
return refused
