-- Rate limits (rpm, tpm): server/ratelimit.py and server/storage/memory_limiters.py, line for
-- line. redis_counters.py prepends this file (after common.lua and lines defining WINDOW_MS
-- and MAX_LEVEL from Python) to reserve.lua and settle.lua.
--
-- A limiter is a hash {level, at}: its level in unit-milliseconds (one request or token is
-- WINDOW_MS of level; a limit of L per minute drains L per millisecond) as of `at`, Unix
-- milliseconds of the caller's clock. Both are stored as decimal strings. Keys expire (PEXPIRE)
-- when the bucket has drained, so an idle limiter vanishes; a bucket that empties is deleted.
--
-- Exact: every value is an integer below 2^53 (levels are capped at MAX_LEVEL = 2^52, limits
-- times WINDOW_MS and charges times WINDOW_MS are below 2^46), so doubles hold them exactly;
-- divisions go through idiv, which corrects the rounding of the double quotient. The one
-- product that could be large (rate times elapsed time) is only formed when it is below the
-- level.

-- floor(a / b) for integers a (any sign) and b > 0, exactly.
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

local function ceil_div(a, b)
  return -idiv(-a, b)
end

-- ratelimit.drained: the level at now_ms (a clock that stepped back drains nothing).
local function rl_drained(level, at, per_minute, now_ms)
  local elapsed = now_ms - at
  if elapsed <= 0 then
    return level
  end
  if elapsed >= ceil_div(level, per_minute) then
    return 0
  end
  return level - per_minute * elapsed
end

-- ratelimit.admits
local function rl_admits(unit, per_minute, level, amount, mode)
  local capacity = per_minute * WINDOW_MS
  if unit == 'rpm' or mode == 'never_exceed' then
    return level + math.max(amount, 0) * WINDOW_MS <= capacity
  end
  return level < capacity
end

-- ratelimit.retry_after_ms
local function rl_retry_after_ms(unit, per_minute, level, amount, mode)
  local capacity = per_minute * WINDOW_MS
  local excess
  if unit == 'rpm' or mode == 'never_exceed' then
    excess = level + math.max(amount, 0) * WINDOW_MS - capacity
  else
    excess = level - capacity + 1
  end
  return math.max(1, ceil_div(excess, per_minute))
end

-- ratelimit.charge
local function rl_charge(level, amount)
  return math.min(MAX_LEVEL, math.max(0, level + amount * WINDOW_MS))
end

-- ratelimit.expiry_ms
local function rl_expiry_ms(per_minute, level)
  return ceil_div(level, per_minute) + 1
end

-- The charges of a call: charge j is limiter KEYS[first_key + j - 1] with ARGV[first_arg +
-- 3(j-1) ..] = unit ('rpm' | 'tpm'), per_minute, amount; the limiter keys run to the end of
-- KEYS. Returns the charges and, per limiter key, its bucket drained to now_ms:
-- {read = level as read, level = level (changed by the caller), at = as of, per_minute}.
local function rl_load(first_key, first_arg, now_ms)
  local charges, buckets = {}, {}
  for j = 1, #KEYS - first_key + 1 do
    local key, a = KEYS[first_key + j - 1], first_arg + 3 * (j - 1)
    local charge = {
      key = key,
      unit = ARGV[a],
      per_minute = tonumber(ARGV[a + 1]),
      amount = tonumber(ARGV[a + 2]),
    }
    if not buckets[key] then
      local row = redis.call('HMGET', key, 'level', 'at')
      local level, at = 0, now_ms
      if row[1] and row[2] then
        local stored_at = tonumber(row[2])
        level = rl_drained(tonumber(row[1]), stored_at, charge.per_minute, now_ms)
        at = math.max(stored_at, now_ms) -- a level read before `at` is still as of `at`
      end
      buckets[key] = {read = level, level = level, at = at, per_minute = charge.per_minute}
    end
    charges[j] = charge
  end
  return charges, buckets
end

-- memory_limiters.plan: check each charge in order (an earlier charge of the same limiter in
-- this call counts), taking the admitted ones from the levels. Returns the 0-based index of
-- the first refusing charge (-1: none) and the longest wait (ms) of the refusing ones.
local function rl_plan(charges, buckets, mode)
  local refused, retry = -1, 0
  for j, c in ipairs(charges) do
    local bucket = buckets[c.key]
    if rl_admits(c.unit, c.per_minute, bucket.level, c.amount, mode) then
      bucket.level = rl_charge(bucket.level, c.amount)
    else
      if refused < 0 then
        refused = j - 1
      end
      retry = math.max(retry, rl_retry_after_ms(c.unit, c.per_minute, bucket.level, c.amount, mode))
    end
  end
  return refused, retry
end

-- Write every limiter of the call back (in charge order); an empty one is deleted.
local function rl_save(charges, buckets, now_ms)
  local saved = {}
  for _, c in ipairs(charges) do
    local bucket = buckets[c.key]
    if not saved[c.key] then
      saved[c.key] = true
      if bucket.level <= 0 then
        redis.call('DEL', c.key)
      else
        redis.call('HSET', c.key, 'level', string.format('%.0f', bucket.level),
          'at', string.format('%.0f', bucket.at))
        -- Relative to now: the bucket is empty (ratelimit.expiry_ms) after its `at`.
        redis.call('PEXPIRE', c.key, bucket.at - now_ms + rl_expiry_ms(bucket.per_minute, bucket.level))
      end
    end
  end
end

-- Each charge's limiter level, as read (field 'read') or now (field 'level').
local function rl_levels(charges, buckets, field)
  local out = {}
  for j, c in ipairs(charges) do
    out[j] = buckets[c.key][field]
  end
  return out
end
