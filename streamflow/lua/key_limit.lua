#!lua
-- Per-key limits of a role across every worker: for one limit key (a customer id, say), a cap
-- on its jobs running at once and a start rate (GCRA, no burst). Every key shares {flow:<role>}.
-- KEYS[1] flow control hash (fields key_concurrency, key_rate_count, key_rate_period_ms
--         override the declared ones; 0 means no limit), KEYS[2] the key's running slots
--         (zset: token -> expiry ms), KEYS[3] the key's rate state (next start time, ms),
--         KEYS[4] the role's keys holding slots (zset: limit key -> latest expiry ms),
--         KEYS[5] the role's keys with parked jobs (zset: limit key -> mark count)
-- ARGV[1] acquire | acquire_many | free | parked | renew | release | release_many | unmark,
--         ARGV[2] the limit key (unused by the *_many ops),
-- ARGV[3] declared key rate count, ARGV[4] declared rate period ms, ARGV[5] declared key
--         concurrency (0: none), ARGV[6] slot ttl ms, ARGV[7..n] tokens
-- acquire (one token): {1, next, tracked} when granted (tracked: the token holds a running slot;
--          next: with a rate, the server time of the key's next start, else 0);
--          {0, wake at ms} when not: the server time at which to ask again (the earliest
--          slot's expiry, or the next start the rate allows).
-- acquire_many / release_many: several keys of the role in one call (a worker's whole read):
--          ARGV[7..] is, for each key, <limit key> <n> <token 1> .. <token n>; the g-th key's
--          slots and rate are KEYS[2], KEYS[3] for the first, KEYS[2 + 2g], KEYS[3 + 2g] after.
--          acquire_many returns each token's reply in order, flattened: granted, next or wake
--          at, tracked (3 numbers each, as acquire's); release_many each key's mark count.
-- free: 1 if an acquire would be granted now (nothing taken), else 0.
-- parked: a job of the key was just parked: marks the key (its mark count rises), then as free.
-- release: frees the tokens' slots; returns the key's mark count (0: no parked job known, no
--          wake needed). unmark: removes the mark if its count is still ARGV[7] (no job was
--          parked since the releaser found none to wake).
-- renew: extends the tokens' slots (only those still held).
-- Uses the server's clock, so workers with skewed clocks agree.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, key, ttl = ARGV[1], ARGV[2], tonumber(ARGV[6])

local function setting(field, declared)
  local value = redis.call('HGET', KEYS[1], field)
  return tonumber(value or declared) or 0
end

if op == 'release' then
  for i = 7, #ARGV do redis.call('ZREM', KEYS[2], ARGV[i]) end
  if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('ZREM', KEYS[4], key) end
  return tonumber(redis.call('ZSCORE', KEYS[5], key) or '0')
end
if op == 'release_many' then
  -- Each key costs a ZREM and a ZCARD; the keys left without slots leave the index in one
  -- ZREM, and the marks are read only if some key has parked jobs at all.
  local out, g, i, idle = {}, 1, 7, {}
  local marked = redis.call('ZCARD', KEYS[5]) > 0
  while i <= #ARGV do
    local limit_key, n = ARGV[i], tonumber(ARGV[i + 1])
    local slots = KEYS[2]
    if g > 1 then slots = KEYS[2 + 2 * g] end
    redis.call('ZREM', slots, unpack(ARGV, i + 2, i + 1 + n))
    if redis.call('ZCARD', slots) == 0 then idle[#idle + 1] = limit_key end
    out[#out + 1] = marked and tonumber(redis.call('ZSCORE', KEYS[5], limit_key) or '0') or 0
    i, g = i + 2 + n, g + 1
  end
  if #idle > 0 then redis.call('ZREM', KEYS[4], unpack(idle)) end
  return out
end
if op == 'unmark' then
  if redis.call('ZSCORE', KEYS[5], key) == ARGV[7] then redis.call('ZREM', KEYS[5], key) end
  return 0
end
if op == 'parked' then
  redis.call('ZINCRBY', KEYS[5], 1, key)
  op = 'free'
end
if op == 'renew' then
  local kept = 0
  for i = 7, #ARGV do kept = kept + redis.call('ZADD', KEYS[2], 'XX', 'CH', now + ttl, ARGV[i]) end
  if kept > 0 then redis.call('ZADD', KEYS[4], 'GT', now + ttl, key) end
  return kept
end

local count, period
if redis.call('HEXISTS', KEYS[1], 'key_rate_count') == 1 then
  count, period = setting('key_rate_count', 0), setting('key_rate_period_ms', 0)
else
  count, period = tonumber(ARGV[3]) or 0, tonumber(ARGV[4]) or 0
end
local step = nil
if count > 0 and period > 0 then step = period / count end
local cap = setting('key_concurrency', ARGV[5])
if cap <= 0 then cap = nil end

-- nil if a job of the key may start now, else the server time at which to ask again.
local function refused(slots, rate)
  if cap then
    redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)  -- slots of workers that died
    if redis.call('ZCARD', slots) >= cap then
      local first = redis.call('ZRANGE', slots, 0, 0, 'WITHSCORES')
      return math.max(math.ceil(tonumber(first[2])), now + 1)
    end
  end
  if step then
    local tat = math.max(tonumber(redis.call('GET', rate) or '') or now, now)
    if tat > now then return math.ceil(tat) end
  end
  return nil
end

-- Grant token a start (refused said it may): {1, next, tracked}, as acquire's.
local function grant(slots, rate, limit_key, token)
  local next = 0
  if step then
    redis.call('SET', rate, string.format('%.3f', now + step), 'PX', math.ceil(step) + 1000)
    next = math.ceil(now + step)
  end
  if cap then
    redis.call('ZADD', slots, now + ttl, token)
    redis.call('ZADD', KEYS[4], 'GT', now + ttl, limit_key)
    return {1, next, 1}
  end
  return {1, next, 0}
end

-- acquire_many's answer for one key's tokens (ARGV[from .. from + n - 1]), appended to out:
-- the same as acquiring them one by one, with each key looked at and written once.
local function acquire_group(slots, rate, from, n, out)
  local held, first = 0, nil
  if cap then
    held = redis.call('ZCARD', slots)
    if held + n > cap then  -- the slots of workers that died count only when they would bind
      redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
      held = redis.call('ZCARD', slots)
    end
  end
  local tat = now
  if step then tat = math.max(tonumber(redis.call('GET', rate) or '') or now, now) end
  local granted = {}
  for j = from, from + n - 1 do
    if cap and held >= cap then
      if not first then  -- the earliest expiry (of a slot granted here if none was held)
        first = tonumber(redis.call('ZRANGE', slots, 0, 0, 'WITHSCORES')[2] or '') or now + ttl
      end
      out[#out + 1], out[#out + 2], out[#out + 3] = 0, math.max(math.ceil(first), now + 1), 0
    elseif tat > now then
      out[#out + 1], out[#out + 2], out[#out + 3] = 0, math.ceil(tat), 0
    else
      local next = 0
      if step then
        tat = now + step
        next = math.ceil(tat)
      end
      if cap then
        held = held + 1
        granted[#granted + 1] = now + ttl
        granted[#granted + 1] = ARGV[j]
      end
      out[#out + 1], out[#out + 2], out[#out + 3] = 1, next, cap and 1 or 0
    end
  end
  if step and tat > now then
    redis.call('SET', rate, string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
  end
  if #granted > 0 then
    redis.call('ZADD', slots, unpack(granted))
    return true
  end
  return false
end

if op == 'acquire_many' then
  local out, g, i, busy = {}, 1, 7, {}
  while i <= #ARGV do
    local limit_key, n = ARGV[i], tonumber(ARGV[i + 1])
    local slots, rate = KEYS[2], KEYS[3]
    if g > 1 then slots, rate = KEYS[2 + 2 * g], KEYS[3 + 2 * g] end
    if acquire_group(slots, rate, i + 2, n, out) then
      busy[#busy + 1] = now + ttl
      busy[#busy + 1] = limit_key
    end
    i, g = i + 2 + n, g + 1
  end
  if #busy > 0 then  -- the keys holding slots, in one command; those whose holders all died go
    redis.call('ZADD', KEYS[4], 'GT', unpack(busy))
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - ttl)
  end
  return out
end

local wake = refused(KEYS[2], KEYS[3])
if op == 'free' then
  if wake then return 0 end
  return 1
end
if wake then return {0, wake} end
local reply = grant(KEYS[2], KEYS[3], key, ARGV[7])
if reply[3] == 1 then redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - ttl) end
return reply
