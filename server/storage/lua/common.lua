-- Helpers shared by the scripts. redis_counters.py prepends this file (after lines defining
-- PURGE_LIMIT and RECOVERY_CLAIM, so Python and Lua share one value of each) to each script.
--
-- Money stays exact. Lua 5.1 numbers are doubles, exact only for integers below 2^53 nano
-- (about 9 million USD), while a counter may legitimately reach ~1e18 nano. So:
--   * spend and held are only ever changed with HINCRBY, which is exact 64-bit arithmetic in
--     Redis, with the amounts passed as decimal strings;
--   * values are read back with HGET/HMGET (strings), never from HINCRBY's reply, which Lua
--     turns into a double;
--   * the rule compares by splitting each decimal string into hi * 1e9 + lo, where both parts
--     stay below 2^34; a sum or difference of a few such parts is exact in a double, so the
--     comparison is exact for every value below 2^63.
--
-- Keys of a hold's counters are read from the hold record instead of KEYS: the counters an
-- expired hold sits on cannot be known before the script runs. Every one of them carries the
-- team's hash tag, so they live in the same slot as the declared keys and the scripts still
-- run unchanged on Redis Cluster.

local BILLION = 1000000000

-- A decimal integer string as (hi, lo) with value = hi * 1e9 + lo.
local function split(s)
  local sign = 1
  if string.sub(s, 1, 1) == '-' then
    sign = -1
    s = string.sub(s, 2)
  end
  local n = string.len(s)
  if n <= 9 then
    return 0, sign * tonumber(s)
  end
  return sign * tonumber(string.sub(s, 1, n - 9)), sign * tonumber(string.sub(s, n - 8))
end

-- The sign (-1, 0, 1) of hi * 1e9 + lo, for parts that are not yet normalised.
local function sign_of(hi, lo)
  local carry = math.floor(lo / BILLION)
  hi = hi + carry
  lo = lo - carry * BILLION -- now 0 <= lo < 1e9, so hi alone decides unless it is 0
  if hi > 0 then return 1 end
  if hi < 0 then return -1 end
  if lo > 0 then return 1 end
  return 0
end

-- server.rules.admits, line for line; limit '-1' means unlimited.
local function admits(mode, limit, spend, held, amount)
  if limit == '-1' then
    return true
  end
  local hi, lo = split(limit)
  local shi, slo = split(spend)
  local hhi, hlo = split(held)
  hi, lo = hi - shi - hhi, lo - slo - hlo -- limit - spend - held
  if mode == 'never_exceed' then
    local ahi, alo = split(amount)
    return sign_of(hi - ahi, lo - alo) >= 0 -- spend + held + amount <= limit
  elseif mode == 'cross_once' then
    return sign_of(hi, lo) > 0 -- spend + held < limit
  end
  error('unknown enforcement mode: ' .. tostring(mode))
end

-- Drop a hold: subtract its amount from `held` of the counters it was placed on.
local function release_hold(holds_key, expiry_key, rid)
  local record = redis.call('HGET', holds_key, rid)
  redis.call('ZREM', expiry_key, rid)
  if not record then
    return false
  end
  redis.call('HDEL', holds_key, rid)
  local hold = cjson.decode(record) -- [amount, counter key, counter key, ...]
  local minus = '-' .. hold[1]
  for i = 2, #hold do
    -- A counter that expired or was lost is not recreated: init rebuilds it from the ledger.
    if redis.call('EXISTS', hold[i]) == 1 then
      -- Below zero only when a counter was rebuilt under a hold placed before; clamp so a
      -- stale hold cannot hand out headroom that was never held.
      if redis.call('HINCRBY', hold[i], 'held', minus) < 0 then
        redis.call('HSET', hold[i], 'held', '0')
      end
    end
  end
  return true
end

-- Take `amount` (a decimal string) off a hold, keeping the rest; all of it when less is left.
-- Only leases are shrunk, and their amounts stay below 2^53 (MAX_PARTIAL_RELEASE), so the
-- subtraction here is exact in Lua's doubles; counters change by HINCRBY as everywhere.
local function shrink_hold(holds_key, expiry_key, rid, amount)
  local record = redis.call('HGET', holds_key, rid)
  if not record then
    return
  end
  local hold = cjson.decode(record) -- [amount, counter key, counter key, ...]
  local left = tonumber(hold[1]) - tonumber(amount)
  if left <= 0 then
    release_hold(holds_key, expiry_key, rid)
    return
  end
  hold[1] = string.format('%.0f', left)
  redis.call('HSET', holds_key, rid, cjson.encode(hold))
  for i = 2, #hold do
    if redis.call('EXISTS', hold[i]) == 1 then
      if redis.call('HINCRBY', hold[i], 'held', '-' .. amount) < 0 then
        redis.call('HSET', hold[i], 'held', '0')
      end
    end
  end
end

-- Release holds that expired at or before `now`, oldest first, at most PURGE_LIMIT per call
-- so one decision never does unbounded work.
local function purge(holds_key, expiry_key, now)
  local due = redis.call('ZRANGEBYSCORE', expiry_key, '-inf', now, 'LIMIT', 0, PURGE_LIMIT)
  for _, rid in ipairs(due) do
    release_hold(holds_key, expiry_key, rid)
  end
end

-- spend1, held1, spend2, held2, ... of KEYS[first..last] (last defaults to #KEYS); false
-- (nil in the reply) where missing.
local function read_states(first, last)
  local out = {}
  for i = first, last or #KEYS do
    local row = redis.call('HMGET', KEYS[i], 'spend', 'held')
    out[#out + 1] = row[1]
    out[#out + 1] = row[2]
  end
  return out
end

-- a < b for non-negative decimal integer strings without leading zeros (exact at any size).
local function dec_lt(a, b)
  if #a ~= #b then
    return #a < #b
  end
  return a < b
end

-- server.storage.snapshots.visible, line for line: is ledger transaction `xact` (a decimal
-- string, '' = unknown) visible in the Postgres snapshot `snap` ('xmin:xmax:xip1,xip2,...';
-- false or '' = none), i.e. was its row already in the sum the counter was built from?
local function visible(xact, snap)
  if xact == '' or not snap or snap == '' then
    return false
  end
  local xmin, xmax, xip = string.match(snap, '^(%d+):(%d+):(.*)$')
  if dec_lt(xact, xmin) then
    return true
  end
  if not dec_lt(xact, xmax) then
    return false
  end
  for x in string.gmatch(xip, '%d+') do
    if x == xact then
      return false
    end
  end
  return true
end

-- Request ids announced by begin.lua whose settle is overdue (their budgetd died between
-- the ledger commit and the settle?), at most PURGE_LIMIT. Each is claimed for
-- RECOVERY_CLAIM seconds, so one caller at a time settles it from the ledger.
local function claim_unsettled(inflight_key, now)
  local due = redis.call('ZRANGEBYSCORE', inflight_key, '-inf', now, 'LIMIT', 0, PURGE_LIMIT)
  for _, rid in ipairs(due) do
    redis.call('ZADD', inflight_key, tonumber(now) + RECOVERY_CLAIM, rid)
  end
  return due
end
