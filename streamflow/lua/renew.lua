#!lua flags=allow-oom
-- Renew the leases of entries this process is running: reset their idle time.
-- A plain XCLAIM JUSTID would also take back an entry another worker has adopted (two would run
-- it), so only entries still owned by this consumer are renewed; the others are reported lost.
-- KEYS[1] role stream
-- An entry released at shutdown (idle set at or past ARGV[3]) is not renewed: a renewal that
-- raced the release would otherwise pull it back from immediate adoption for a whole TTL.
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] idle ms of a released entry, ARGV[4..n] entry ids
-- Returns the ids whose lease is lost (owned by another consumer, no longer pending, released).
local stream, group, me, released = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local mine, start, page = {}, '-', 1000
while true do
  local rows = redis.call('XPENDING', stream, group, start, '+', page, me)
  for _, row in ipairs(rows) do
    if row[3] < released then
      mine[row[1]] = true
    end
  end
  if #rows < page then
    break
  end
  start = '(' .. rows[#rows][1]
end
local claim, lost = {stream, group, me, 0}, {}
for i = 4, #ARGV do
  if mine[ARGV[i]] then
    claim[#claim + 1] = ARGV[i]
  else
    lost[#lost + 1] = ARGV[i]
  end
end
if #claim > 4 then
  claim[#claim + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(claim))
end
return lost
