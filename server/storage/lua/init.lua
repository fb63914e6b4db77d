-- init: create missing counters from the ledger's spend; existing counters are left alone, so
-- a rebuild racing with live traffic (or a second rebuild) never adds to a counter.
--
-- KEYS[i]      counter hash {spend, held}
-- ARGV[2i-1]   its spend (integer nano-USD, decimal)
-- ARGV[2i]     its TTL in whole seconds; "0" = keep forever (an all-time budget)
--
-- Returns the number of counters created.

local created = 0
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('HSET', KEYS[i], 'spend', ARGV[2 * i - 1], 'held', '0')
    if ARGV[2 * i] ~= '0' then
      redis.call('EXPIRE', KEYS[i], ARGV[2 * i])
    end
    created = created + 1
  end
end
return created
