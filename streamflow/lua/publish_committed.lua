#!lua
-- Publish a job from a task's outbox in the round trip of the commit that wrote it (a single
-- Redis: sent right after task_commit.lua in one pipeline): only if the outbox holds the item
-- exactly as given, so a commit that lost its race publishes nothing. The rest of this script
-- is publish_dedup.lua (appended when it is loaded).
-- KEYS[1] role stream, KEYS[2] dedup marker, KEYS[3] role's delayed schedule, KEYS[4] outbox
-- ARGV[1] message id, ARGV[2] dedup window in ms, ARGV[3] message JSON, ARGV[4] due (0: now),
-- ARGV[5] the item's name in the outbox, ARGV[6] the encoded item
-- Returns {-1, ''} when the outbox does not hold the item (the caller carries it out as usual),
-- otherwise what publish_dedup.lua returns.
if redis.call('HGET', KEYS[4], ARGV[5]) ~= ARGV[6] then
  return {-1, ''}
end
