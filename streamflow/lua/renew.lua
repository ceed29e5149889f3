#!lua
-- Renew the leases of entries this process is running: reset their idle time.
-- A plain XCLAIM JUSTID would also take back an entry another worker has adopted (two would run
-- it), so only entries still owned by this consumer are renewed; the others are reported lost.
-- KEYS[1] role stream
-- ARGV[1] group, ARGV[2] consumer, ARGV[3..n] entry ids
-- Returns the ids whose lease is lost (owned by another consumer, or no longer pending).
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local mine, start, page = {}, '-', 1000
while true do
  local rows = redis.call('XPENDING', stream, group, start, '+', page, me)
  for _, row in ipairs(rows) do
    mine[row[1]] = true
  end
  if #rows < page then
    break
  end
  start = '(' .. rows[#rows][1]
end
local claim, lost = {stream, group, me, 0}, {}
for i = 3, #ARGV do
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
