#!lua
-- A role's flow limits across every worker: a start rate (GCRA with a burst: as many starts
-- per call as are due, see below) and a cap on jobs running at once. Every key shares
-- {flow:<role>}.
-- KEYS[1] flow control hash (fields rate_count, rate_period_ms, concurrency override the
--         declared ones; 0 means no limit), KEYS[2] rate state (the theoretical arrival time
--         TAT, ms with us precision), KEYS[3] running slots (zset: token -> expiry ms)
-- ARGV[1] acquire | confirm | renew | release | refund
-- ARGV[2] declared rate count, ARGV[3] declared rate period ms, ARGV[4] declared concurrency
--         (0: none), ARGV[5] slot ttl ms, ARGV[6] burst window ms, ARGV[7] starts to refund (confirm),
--         ARGV[8] the TAT an acquire returned (refund), ARGV[9..n] tokens
-- Rate: emission interval T = period / count, burst B = max(1, floor(window / T)). A call
--   grants n = min(tokens, floor((now + B*T - max(TAT, now)) / T)) starts and sets
--   TAT = max(TAT, now) + n*T, so TAT never passes now + B*T: over any interval of length w
--   at most w / T + B starts are granted, and a caller that asks late gets every start due
--   since (up to B) in one call.
-- acquire: returns {granted, wait us, slots, TAT}: the first `granted` tokens hold a start
--          (and, if slots is 1, a running slot); with none granted, wait us until the next
--          start is due (-1: until a running slot frees). TAT is '' without a rate limit.
-- confirm: {granted, wait us} for up to ARGV[7] starts at the rate alone (no slots): a grant
--          that aged in a blocked read is taken again when its entry arrives, so that the
--          start counts when it happens.
-- renew: extends the tokens' slots; release: frees them; refund: gives back the last
--        ARGV[7] starts of the acquire that returned TAT ARGV[8], only if no start was
--        granted since (TAT unchanged), so that a refund can never let a window exceed the
--        bound above. Returns {refunded (0/1), 0}.
-- Uses the server's clock, so workers with skewed clocks agree.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local op = ARGV[1]
local ttl = tonumber(ARGV[5])
local first_token = 9

local function setting(field, declared)
  local value = redis.call('HGET', KEYS[1], field)
  return tonumber(value or declared) or 0
end

-- The emission interval (ms) and the burst (starts), or nil without a rate limit.
local function rate()
  local count, period
  if redis.call('HEXISTS', KEYS[1], 'rate_count') == 1 then
    count, period = setting('rate_count', 0), setting('rate_period_ms', 0)
  else
    count, period = tonumber(ARGV[2]) or 0, tonumber(ARGV[3]) or 0
  end
  if count <= 0 or period <= 0 then return nil end
  local step = period / count
  return step, math.max(1, math.floor((tonumber(ARGV[6]) or 0) / step + 1e-9))
end

local function cap()
  local value = setting('concurrency', ARGV[4])
  if value <= 0 then return nil end
  return value
end

local function set_tat(tat)
  local text = string.format('%.3f', tat)
  redis.call('SET', KEYS[2], text, 'PX', math.ceil(math.max(tat - now, 0)) + 1000)
  return text
end

if op == 'release' then
  for i = first_token, #ARGV do redis.call('ZREM', KEYS[3], ARGV[i]) end
  return {0, 0}
end
if op == 'renew' then
  for i = first_token, #ARGV do redis.call('ZADD', KEYS[3], now + ttl, ARGV[i]) end
  return {0, 0}
end
local step, burst = rate()
if op == 'refund' then
  local stored = redis.call('GET', KEYS[2])
  local tat = tonumber(stored or '')
  if not (step and tat and stored == ARGV[8]) then return {0, 0} end
  set_tat(math.max(now, tat - step * (tonumber(ARGV[7]) or 0)))
  return {1, 0}
end

-- Up to `wanted` starts at the rate: how many, the wait (us) if none, the state it leaves.
local function take(wanted)
  local tat = math.max(tonumber(redis.call('GET', KEYS[2]) or '') or now, now)
  local due = math.floor((now + burst * step - tat) / step + 1e-9)
  if due < 1 then
    return 0, math.max(1, math.ceil((tat - (burst - 1) * step - now) * 1000)), ''
  end
  local granted = math.min(wanted, due)
  if granted <= 0 then return 0, 0, '' end
  return granted, 0, set_tat(tat + granted * step)
end

if op == 'confirm' then
  if not step then return {tonumber(ARGV[7]) or 0, 0} end
  local granted, wait = take(tonumber(ARGV[7]) or 0)
  return {granted, wait}
end

local grant, wait = #ARGV - first_token + 1, 0
local slots = cap()
if slots then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)  -- slots of workers that died
  local free = slots - redis.call('ZCARD', KEYS[3])
  if free < grant then grant, wait = math.max(free, 0), -1 end
end
local shown = ''
if step then
  local rate_wait
  grant, rate_wait, shown = take(grant)
  if rate_wait > 0 then wait = rate_wait end
end
if grant > 0 then
  if slots then
    for i = 1, grant do redis.call('ZADD', KEYS[3], now + ttl, ARGV[first_token - 1 + i]) end
  end
end
return {grant, wait, slots and 1 or 0, shown}
