#!lua flags=allow-oom
-- Acknowledge and delete entries that this consumer still owns (fenced ack).
-- Any consumer may XACK any pending id, so the owner check and the ack must be one atomic step:
-- a worker that lost its lease must not acknowledge an entry another worker is now running.
-- KEYS[1] role stream
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] entry ids separated by spaces (one argument: the
-- client packs one argument much faster than hundreds)
-- Returns the ids that were refused (no longer pending, or owned by another consumer).
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
-- One XPENDING of this consumer's entries (paged) instead of one call per id. A consumer name
-- belongs to one live process, so that list holds only what this worker holds: a few dozen.
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
local owned, refused = {}, {}
for id in string.gmatch(ARGV[3], '%S+') do
  if mine[id] then
    owned[#owned + 1] = id
  else
    refused[#refused + 1] = id
  end
end
if #owned > 0 then
  redis.call('XACK', stream, group, unpack(owned))
  -- Delete on ack: an acknowledged entry is never needed again, and XACK alone leaves the
  -- stream growing forever.
  redis.call('XDEL', stream, unpack(owned))
end
return refused
