#!lua
-- Schedule the next attempt of an entry this consumer owns, and settle the current one.
-- The next attempt waits in the role's delayed schedule (a sorted set scored by due time), so a
-- backoff holds no worker slot and survives worker restarts; a due time of 0 re-queues at once.
-- KEYS[1] role stream, KEYS[2] delayed schedule
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] entry id, ARGV[4] due ms, ARGV[5] next message JSON
-- Returns 1, or false when the entry is no longer ours.
-- Owner check (owned_entry) is fence.lua, which scripts.py prepends.
if not owned_entry(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then
  return false
end
if tonumber(ARGV[4]) == 0 then
  redis.call('XADD', KEYS[1], '*', 'message', ARGV[5])
else
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
