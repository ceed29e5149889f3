#!lua
-- Publish a job unless its dedup key was seen within the dedup window.
-- KEYS[1] role stream, KEYS[2] dedup marker
-- ARGV[1] message id, ARGV[2] dedup window in ms, ARGV[3] message JSON
-- Returns {1, entry id} when published, {0, id of the message that used the key first}.
local first = redis.call('GET', KEYS[2])
if first then
  return {0, first}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {1, redis.call('XADD', KEYS[1], '*', 'message', ARGV[3])}
