#!lua flags=allow-oom
-- Acknowledge and delete entries that this consumer still owns (fenced ack).
-- Any consumer may XACK any pending id, so the owner check and the ack must be one atomic step:
-- a worker that lost its lease must not acknowledge an entry another worker is now running.
-- KEYS[1] role stream
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] entry ids as a JSON array of strings (one argument:
-- the client packs one argument about ten times faster than hundreds, and cjson splits it in
-- half the time a Lua loop takes)
-- Returns the ids that were refused (no longer pending, or owned by another consumer).
-- Owner check (split_owned) and deletion (ack_delete) are fence.lua, which scripts.py prepends.
local stream, group = KEYS[1], ARGV[1]
local owned, refused = split_owned(stream, group, ARGV[2], cjson.decode(ARGV[3]))
ack_delete(stream, group, owned)
return refused
