#!lua flags=allow-oom
-- Acknowledge and delete entries that this consumer still owns (fenced ack).
-- Any consumer may XACK any pending id, so the owner check and the ack must be one atomic step:
-- a worker that lost its lease must not acknowledge an entry another worker is now running.
-- KEYS[1] role stream
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] entry ids separated by spaces (one argument: the
-- client packs one argument much faster than hundreds)
-- Returns the ids that were refused (no longer pending, or owned by another consumer).
-- Owner check (owned_entry, owned_ids, split_owned) is fence.lua, which streams.py prepends.
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local ids = {}
for id in string.gmatch(ARGV[3], '%S+') do
  ids[#ids + 1] = id
end
local owned = {}
local refused = split_owned(owned_ids(stream, group, me), ids, owned)
if #owned > 0 then
  redis.call('XACK', stream, group, unpack(owned))
  -- Delete on ack: an acknowledged entry is never needed again, and XACK alone leaves the
  -- stream growing forever.
  redis.call('XDEL', stream, unpack(owned))
end
return refused
