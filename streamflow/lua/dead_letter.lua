#!lua
-- Move one entry to the dead-letter stream, if this consumer still owns it.
-- Adding the dead letter, acknowledging and deleting the original happen in one step, so the
-- entry is never in neither stream nor in both. For a task node's job the same step reports
-- the failure on the role's events stream; for a job whose outcome is kept, it writes the
-- failure record too (a worker killed in between cannot leave the dead letter without it).
-- KEYS[1] role stream, KEYS[2] dead-letter stream, KEYS[3] role events stream,
-- KEYS[4] (optional) the job's result key
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] entry id, ARGV[4] dead-letter stream max length,
-- ARGV[5] failure event JSON or '', ARGV[6..n] field, value pairs of the dead-letter entry,
-- then, with KEYS[4] only, the result JSON and its TTL in ms as the last two
-- Returns the dead-letter entry id, or false when the entry is no longer ours.
-- Owner check (owned_entry) is fence.lua, which scripts.py prepends.
if not owned_entry(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then
  return false
end
local last = #ARGV
if KEYS[4] then
  last = last - 2
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 6, last))
if ARGV[5] ~= '' then
  redis.call('XADD', KEYS[3], '*', 'event', ARGV[5])
end
if KEYS[4] then
  redis.call('SET', KEYS[4], ARGV[last + 1], 'PX', ARGV[last + 2])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return id
