#!lua flags=allow-oom
-- Renew the leases of entries this process is running: reset their idle time.
-- A plain XCLAIM JUSTID would also take back an entry another worker has adopted (two would run
-- it), so only entries still owned by this consumer are renewed; the others are reported lost.
-- KEYS[1] role stream
-- An entry released at shutdown (idle set at or past ARGV[3]) is not renewed: a renewal that
-- raced the release would otherwise pull it back from immediate adoption for a whole TTL.
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] idle ms of a released entry, ARGV[4..n] entry ids
-- Returns the ids whose lease is lost (owned by another consumer, no longer pending, released).
-- Owner check (owned_entry, owned_ids, split_owned) is fence.lua, which streams.py prepends.
local stream, group, me, released = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local claim = {stream, group, me, 0}
local lost = split_owned(owned_ids(stream, group, me, released), {unpack(ARGV, 4)}, claim)
if #claim > 4 then
  claim[#claim + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(claim))
end
return lost
