#!lua
-- Move due messages from the delayed schedule to the role stream, atomically (each message is
-- moved by exactly one worker even when every worker runs this).
-- KEYS[1] role stream, KEYS[2] delayed schedule
-- ARGV[1] the most messages to move, ARGV[2] (optional) move up to this score instead of now
-- Returns {moved, score of the next scheduled message or -1}. Uses the server's clock, so
-- workers with skewed clocks agree.
local now = ARGV[2]
if not now then
  local t = redis.call('TIME')
  now = t[1] * 1000 + math.floor(t[2] / 1000)
end
local due = redis.call('ZRANGE', KEYS[2], '-inf', now, 'BYSCORE', 'LIMIT', 0, ARGV[1])
for _, message in ipairs(due) do
  redis.call('XADD', KEYS[1], '*', 'message', message)
  redis.call('ZREM', KEYS[2], message)
end
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
return {#due, nxt[2] or -1}
