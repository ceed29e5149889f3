#!lua
-- Settle a task node's job (acknowledge and delete it) and report how it ended, in one step,
-- if this consumer still owns it: the coordinator never misses the end of a job that is gone,
-- and never hears of one from a worker that lost its lease.
-- KEYS[1] role stream, KEYS[2] role events stream
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] entry id, ARGV[4...] event JSONs, in order (the
-- run's ``accepted`` if not written yet, then how it ended)
-- Returns 1, or false when the entry is no longer ours.
-- Owner check (owned_entry) is fence.lua, which scripts.py prepends.
if not owned_entry(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then
  return false
end
for i = 4, #ARGV do
  redis.call('XADD', KEYS[2], '*', 'event', ARGV[i])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
