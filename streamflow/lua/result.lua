#!lua
-- Keep a job's outcome and settle its entry (acknowledge and delete), in one step, if this
-- consumer still owns it: a worker that lost its lease never writes a result, and the result of
-- a job is there as soon as the job is gone from the stream. Used instead of the batched
-- settle.lua only for jobs whose outcome is kept; not allow-oom, as it writes.
-- KEYS[1] role stream, KEYS[2] the job's result key
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] entry id, ARGV[4] result JSON, ARGV[5] TTL ms
-- Returns 1, or false when the entry is no longer ours.
-- Owner check (owned_entry, owned_ids, split_owned) is fence.lua, which streams.py prepends.
if not owned_entry(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then
  return false
end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
