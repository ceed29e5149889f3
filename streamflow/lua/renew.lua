#!lua flags=allow-oom
-- Renew the leases of entries this process is running: reset their idle time.
-- A plain XCLAIM JUSTID would also take back an entry another worker has adopted (two would run
-- it), so only entries still owned by this consumer are renewed; the others are reported lost.
-- KEYS[1] role stream
-- An entry released at shutdown (idle set at or past ARGV[3]) is not renewed: a renewal that
-- raced the release would otherwise pull it back from immediate adoption for a whole TTL.
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] idle ms of a released entry, ARGV[4..n] entry ids
-- Returns the ids whose lease is lost (owned by another consumer, no longer pending, released).
-- Owner check (split_owned) is fence.lua, which scripts.py prepends.
local stream, group, me, released = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local owned, lost = split_owned(stream, group, me, {unpack(ARGV, 4)}, released)
if #owned > 0 then
  owned[#owned + 1] = 'JUSTID'
  redis.call('XCLAIM', stream, group, me, 0, unpack(owned))
end
return lost
