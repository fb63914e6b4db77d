-- reserve: check every scope with the rule, then every rate limit; only if all admit, hold the
-- amount on each scope and charge each rate limit.
--
-- KEYS[1]           holds hash:  reservation id -> JSON [amount, counter key, counter key, ...]
-- KEYS[2]           hold expiry zset: reservation id -> expiry (Unix seconds)
-- KEYS[3]           in-flight settles zset: request id -> deadline (see begin.lua)
-- KEYS[4..3+n]      one counter hash {spend, held} per scope, in scope order
-- KEYS[4+n..3+n+m]  one limiter hash {level, at} per rate charge, in charge order
-- ARGV[1]           now (Unix seconds)
-- ARGV[2]           mode: "cross_once" | "never_exceed"
-- ARGV[3]           amount to hold (integer nano-USD, decimal)
-- ARGV[4]           reservation id ("" only with amount 0)
-- ARGV[5]           hold expiry (Unix seconds)
-- ARGV[6]           now (Unix milliseconds, an integer: the limiters' clock)
-- ARGV[7]           n, the number of scopes
-- ARGV[8..7+n]      limit per scope, in scope order (integer nano-USD; -1 = unlimited)
-- ARGV[8+n+3(j-1)]  rate charge j: unit, "rpm" | "tpm"
-- ARGV[9+n+3(j-1)]  its limit per minute
-- ARGV[10+n+3(j-1)] its amount (1 for rpm, the estimated tokens for tpm; >= 0)
--
-- Returns {"missing", {i, ...}, unsettled} | {"denied", i, states, unsettled} |
-- {"rate_limited", j, states, levels, retry_ms, unsettled} | {"reserved", states, levels,
-- unsettled}, with 0-based scope and charge indices, states = spend1, held1, spend2, held2,
-- ... as decimal strings, levels = each charge's limiter level (unit-ms, integers) as read
-- ("rate_limited") or after charging ("reserved"), retry_ms = the longest wait of the
-- refusing charges, and unsettled = overdue request ids now claimed. Nothing is held or
-- charged unless everything admits; a missing counter or a budget denial leaves the
-- limiters alone.

local now, mode, amount, rid, expires = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now_ms, scopes = tonumber(ARGV[6]), tonumber(ARGV[7])
local last_counter = 3 + scopes

purge(KEYS[1], KEYS[2], now)
local unsettled = claim_unsettled(KEYS[3], now)
-- A reservation id used again (a retried check) replaces its earlier hold, never stacks on it.
if rid ~= '' then
  release_hold(KEYS[1], KEYS[2], rid)
end

local states = read_states(4, last_counter)
local missing = {}
for i = 1, scopes do
  if not states[2 * i - 1] then
    missing[#missing + 1] = i - 1
  end
end
if #missing > 0 then
  return {'missing', missing, unsettled}
end

for i = 1, scopes do
  if not admits(mode, ARGV[7 + i], states[2 * i - 1], states[2 * i], amount) then
    return {'denied', i - 1, states, unsettled}
  end
end

local charges, buckets = rl_load(last_counter + 1, 8 + scopes, now_ms)
local refused, retry_ms = rl_plan(charges, buckets, mode)
if refused >= 0 then
  return {'rate_limited', refused, states, rl_levels(charges, buckets, 'read'), retry_ms, unsettled}
end

if amount ~= '0' then
  local hold = {amount}
  for i = 4, last_counter do
    redis.call('HINCRBY', KEYS[i], 'held', amount)
    hold[#hold + 1] = KEYS[i]
  end
  redis.call('HSET', KEYS[1], rid, cjson.encode(hold))
  redis.call('ZADD', KEYS[2], expires, rid)
  states = read_states(4, last_counter)
end
rl_save(charges, buckets, now_ms)
return {'reserved', states, rl_levels(charges, buckets, 'level'), unsettled}
