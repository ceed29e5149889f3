#!lua
-- Cancel a task or a message: set its persistent marker, then announce it on the signals stream.
-- The marker makes the cancel outlive the broadcast: work queued, waiting for a retry, adopted
-- later, or read by a worker started after the signal is still never started.
-- KEYS[1] signals stream, KEYS[2] cancel marker
-- ARGV[1] signal JSON, ARGV[2] marker TTL ms, ARGV[3] signals stream max length
-- Returns the signal's stream entry id.
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'signal', ARGV[1])
