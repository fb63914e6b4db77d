-- settle: once per request id, release the reservation's hold, add the cost to each scope and
-- apply the token corrections to their rate limits.
--
-- KEYS[1]                  holds hash:  reservation id -> JSON [amount, counter key, ...]
-- KEYS[2]                  hold expiry zset: reservation id -> expiry (Unix seconds)
-- KEYS[3]                  dedupe marker of the request id
-- KEYS[4]                  in-flight settles zset: request id -> deadline (see begin.lua)
-- KEYS[5..4+n]             one counter hash {spend, held, snap} per scope, in scope order
-- KEYS[5+n..4+2n]          each counter's parked set, in the same order
-- KEYS[5+2n..4+2n+m]       one limiter hash {level, at} per correction, in order
-- ARGV[1]                  now (Unix seconds)
-- ARGV[2]                  reservation id ("" = no hold to release)
-- ARGV[3]                  cost (integer nano-USD, decimal)
-- ARGV[4]                  dedupe marker TTL (whole seconds, >= 1), also the parked sets' TTL
-- ARGV[5]                  the ledger transaction that wrote this spend ("" = unknown)
-- ARGV[6]                  request id
-- ARGV[7]                  now (Unix milliseconds, an integer: the limiters' clock)
-- ARGV[8]                  n, the number of scopes
-- ARGV[9]                  release only this much of the hold ("" = all of it): a lease
--                          (server/storage/leasing.py) gives back one request's part
-- ARGV[10+3(j-1)..12+3(j-1)] correction j: unit, limit per minute, tokens (actual minus
--                          estimated; a negative one refunds, down to an empty bucket)
--
-- A counter whose snapshot already saw the transaction is not added to (its rebuild summed
-- the row). A missing counter is skipped; with a known transaction the cost is parked for the
-- init that recreates it, which adds it unless its own snapshot saw the row. A repeat of the
-- request id changes nothing, corrections included.
--
-- Returns {applied (1 | 0), states, unsettled}: states = spend1, held1, ... as decimal
-- strings, nil where the counter is missing; unsettled = overdue request ids now claimed.

local n = tonumber(ARGV[8])
local xact, cost = ARGV[5], ARGV[3]
purge(KEYS[1], KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[6])
local unsettled = claim_unsettled(KEYS[4], ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {0, read_states(5, 4 + n), unsettled}
end
redis.call('SET', KEYS[3], '1', 'EX', ARGV[4])
if ARGV[2] ~= '' and ARGV[9] ~= '' then
  shrink_hold(KEYS[1], KEYS[2], ARGV[2], ARGV[9])
elseif ARGV[2] ~= '' then
  release_hold(KEYS[1], KEYS[2], ARGV[2])
end
for i = 5, 4 + n do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    if not visible(xact, redis.call('HGET', KEYS[i], 'snap')) then
      redis.call('HINCRBY', KEYS[i], 'spend', cost)
    end
  elseif xact ~= '' then
    redis.call('SADD', KEYS[i + n], xact .. ':' .. cost)
    redis.call('EXPIRE', KEYS[i + n], ARGV[4])
  end
end
local now_ms = tonumber(ARGV[7])
local charges, buckets = rl_load(5 + 2 * n, 10, now_ms)
for _, c in ipairs(charges) do
  buckets[c.key].level = rl_charge(buckets[c.key].level, c.amount)
end
rl_save(charges, buckets, now_ms)
return {1, read_states(5, 4 + n), unsettled}
