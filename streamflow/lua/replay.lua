#!lua
-- Send one dead letter back to its role stream, exactly once: whoever deletes it re-adds it.
-- KEYS[1] role stream, KEYS[2] dead-letter stream
-- ARGV[1] dead-letter entry id, ARGV[2] message JSON to publish
-- Returns the new entry id, or false when the dead letter is gone (replayed or purged).
if redis.call('XDEL', KEYS[2], ARGV[1]) == 1 then
  return redis.call('XADD', KEYS[1], '*', 'message', ARGV[2])
end
return false
