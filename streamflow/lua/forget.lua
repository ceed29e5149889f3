#!lua flags=allow-oom
-- Delete consumers of a group that no live process holds and that hold no pending entry.
-- XGROUP DELCONSUMER drops a consumer's pending entries for good (never delivered again), so
-- the checks and the delete are one script: nothing can be delivered to the consumer between
-- them. It only reads and deletes, which frees memory, so it may run when Redis is full.
-- KEYS[1] stream, KEYS[2..n] the candidates' marks (in the stream's slot)
-- ARGV[1] group, ARGV[2..n] the candidates' consumer names, in the order of their marks
-- Returns the names deleted.
local stream, group = KEYS[1], ARGV[1]
local deleted = {}
for i = 2, #KEYS do
  local name = ARGV[i]
  if redis.call('EXISTS', KEYS[i]) == 0
      and #redis.call('XPENDING', stream, group, '-', '+', 1, name) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', stream, group, name)
    deleted[#deleted + 1] = name
  end
end
return deleted
