#!lua flags=allow-oom
-- Hand entries back on shutdown so that any worker's next reclaim adopts them at once.
-- Their idle time is set past any lease TTL, and their delivery counter one lower, so that the
-- adoption (which adds one) leaves it unchanged: a release is not a failed delivery.
-- KEYS[1] role stream
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] idle ms, ARGV[4..n] entry ids
-- Returns how many entries were released (those this consumer still owned).
-- Owner check (owned_entry) is fence.lua, which scripts.py prepends.
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local released = 0
for i = 4, #ARGV do
  local row = owned_entry(stream, group, me, ARGV[i])
  if row then
    local count = math.max(tonumber(row[4]) - 1, 0)
    redis.call('XCLAIM', stream, group, me, 0, ARGV[i], 'IDLE', ARGV[3], 'RETRYCOUNT', count,
      'JUSTID')
    released = released + 1
  end
end
return released
