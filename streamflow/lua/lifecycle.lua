#!lua
-- Append lifecycle events to the namespace's events stream, capped near a length, in one call
-- (one round trip and one command to encode: a pipeline of XADDs costs the client several
-- times more).
-- KEYS[1] the lifecycle events stream
-- ARGV[1] the cap (XADD MAXLEN ~)
-- ARGV[2..n] one event's JSON each
local stream, cap = KEYS[1], ARGV[1]
for i = 2, #ARGV do
  redis.call('XADD', stream, 'MAXLEN', '~', cap, '*', 'event', ARGV[i])
end
return #ARGV - 1
