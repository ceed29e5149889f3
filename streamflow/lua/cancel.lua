#!lua
-- Cancel a task or a message: set its persistent marker, index it, then announce it on the
-- signals stream. The marker makes the cancel outlive the broadcast: work queued, waiting for a
-- retry, adopted later, or read by a worker started after the signal is still never started.
-- The index lets a starting worker find the live markers without scanning the keyspace.
-- KEYS[1] signals stream, KEYS[2] cancel marker, KEYS[3] cancel index (optional: callers of
-- the two-key form set no index entry, and workers started later do not see the marker)
-- ARGV[1] signal JSON, ARGV[2] marker TTL ms, ARGV[3] signals stream max length,
-- ARGV[4] index member ('<target>:<target id>', with KEYS[3])
-- Returns the signal's stream entry id.
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if KEYS[3] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  -- pcall: a key of another type at the index's name (anyone with write access may make one)
  -- must not stop a cancel; workers warn about it when they load the index.
  redis.pcall('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[4])
  redis.pcall('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'signal', ARGV[1])
