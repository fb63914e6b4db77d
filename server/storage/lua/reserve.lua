-- reserve: check every scope with the rule and, only if all admit, hold the amount on each.
--
-- KEYS[1]     holds hash:  reservation id -> JSON [amount, counter key, counter key, ...]
-- KEYS[2]     hold expiry zset: reservation id -> expiry (Unix seconds)
-- KEYS[3]     in-flight settles zset: request id -> deadline (see begin.lua)
-- KEYS[4..]   one counter hash {spend, held} per scope, in scope order
-- ARGV[1]     now (Unix seconds)
-- ARGV[2]     mode: "cross_once" | "never_exceed"
-- ARGV[3]     amount to hold (integer nano-USD, decimal)
-- ARGV[4]     reservation id ("" only with amount 0)
-- ARGV[5]     hold expiry (Unix seconds)
-- ARGV[6..]   limit per scope, in scope order (integer nano-USD; -1 = unlimited)
--
-- Returns {"missing", {i, ...}, unsettled} | {"denied", i, states, unsettled} |
-- {"reserved", states, unsettled}, with 0-based scope indices, states = spend1, held1,
-- spend2, held2, ... as decimal strings, and unsettled = overdue request ids now claimed.

local now, mode, amount, rid, expires = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local scopes = #KEYS - 3

purge(KEYS[1], KEYS[2], now)
local unsettled = claim_unsettled(KEYS[3], now)
-- A reservation id used again (a retried check) replaces its earlier hold, never stacks on it.
if rid ~= '' then
  release_hold(KEYS[1], KEYS[2], rid)
end

local states = read_states(4)
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
  if not admits(mode, ARGV[5 + i], states[2 * i - 1], states[2 * i], amount) then
    return {'denied', i - 1, states, unsettled}
  end
end

if amount ~= '0' then
  local hold = {amount}
  for i = 4, #KEYS do
    redis.call('HINCRBY', KEYS[i], 'held', amount)
    hold[#hold + 1] = KEYS[i]
  end
  redis.call('HSET', KEYS[1], rid, cjson.encode(hold))
  redis.call('ZADD', KEYS[2], expires, rid)
  states = read_states(4)
end
return {'reserved', states, unsettled}
