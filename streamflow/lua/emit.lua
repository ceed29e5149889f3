#!lua
-- Store one batch a task node emitted and report it, if this consumer still owns the job.
-- The owner check fences a worker that lost its lease: its batches are refused at the source.
-- KEYS[1] role stream, KEYS[2] batch key, KEYS[3] role events stream
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] entry id, ARGV[4] batch JSON, ARGV[5] batch TTL ms,
-- ARGV[6] event JSON
-- Returns 1, or false when the entry is no longer ours.
-- Owner check (owned_entry) is fence.lua, which scripts.py prepends.
if not owned_entry(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then
  return false
end
-- NX: a rerun (a retry) that emits under a number already stored keeps the first content, the
-- one the coordinator recorded and children may already have read.
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5], 'NX')
redis.call('XADD', KEYS[3], '*', 'event', ARGV[6])
return 1
