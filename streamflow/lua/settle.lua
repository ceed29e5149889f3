#!lua
-- Acknowledge and delete entries that this consumer still owns (fenced ack).
-- Any consumer may XACK any pending id, so the owner check and the ack must be one atomic step:
-- a worker that lost its lease must not acknowledge an entry another worker is now running.
-- KEYS[1] role stream
-- ARGV[1] group, ARGV[2] consumer, ARGV[3..n] entry ids
-- Returns the ids that were refused (no longer pending, or owned by another consumer).
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local owned, refused = {}, {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', stream, group, ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == me then
    owned[#owned + 1] = ARGV[i]
  else
    refused[#refused + 1] = ARGV[i]
  end
end
if #owned > 0 then
  redis.call('XACK', stream, group, unpack(owned))
  -- Delete on ack: an acknowledged entry is never needed again, and XACK alone leaves the
  -- stream growing forever.
  redis.call('XDEL', stream, unpack(owned))
end
return refused
