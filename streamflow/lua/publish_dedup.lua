#!lua
-- Publish a job unless its dedup key was seen within the dedup window.
-- KEYS[1] role stream, KEYS[2] dedup marker, KEYS[3] role's delayed schedule
-- ARGV[1] message id, ARGV[2] dedup window in ms, ARGV[3] message JSON,
-- ARGV[4] due time in ms for a delayed publish (0: publish now)
-- Returns {1, entry id or 'scheduled'} when published, {0, id of the message that used the key
-- first}.
-- pcall: another type of key at the marker's name (anyone with write access may make one) is
-- no publish of ours; the SET below replaces it, rather than every publish of the key failing.
local first = redis.pcall('GET', KEYS[2])
if type(first) == 'table' and first.err then
  first = false
end
if first then
  return {0, first}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if tonumber(ARGV[4]) > 0 then
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
  return {1, 'scheduled'}
end
return {1, redis.call('XADD', KEYS[1], '*', 'message', ARGV[3])}
