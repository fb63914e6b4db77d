-- init: create missing counters from the ledger's spend; existing counters are left alone, so
-- a rebuild racing with live traffic (or a second rebuild) never adds to a counter.
--
-- KEYS[1]        the team's epoch (see epoch.lua and RedisCounters.forget_teams)
-- KEYS[2i]       counter hash {spend, held, snap}
-- KEYS[2i+1]     its parked set: "xact:cost" of settles that found the counter missing
-- ARGV[1]        "check": create nothing unless the epoch is still ARGV[2]; "skip": don't
-- ARGV[2]        the epoch read before the ledger was summed
-- ARGV[3i]       counter i's spend (integer nano-USD, decimal)
-- ARGV[3i+1]     its TTL in whole seconds; "0" = keep forever (an all-time budget)
-- ARGV[3i+2]     the ledger snapshot the spend was summed in ("" = none)
--
-- A counter created here also takes in the parked costs whose ledger rows its snapshot did
-- not see (their settle came before the counter, their commit after the sum), and only
-- those: a row the snapshot saw is in the spend already.
--
-- Returns the number of counters created, or -1 when the epoch changed or vanished (nothing
-- created: the counters were forgotten or flushed after the sums were read, with spend the
-- sums may miss and the parked costs that would have made up for it; sum again).

if ARGV[1] == 'check' and (redis.call('GET', KEYS[1]) or '') ~= ARGV[2] then
  return -1
end
local created = 0
for i = 1, (#KEYS - 1) / 2 do
  local counter, parked = KEYS[2 * i], KEYS[2 * i + 1]
  local spend, ttl, snap = ARGV[3 * i], ARGV[3 * i + 1], ARGV[3 * i + 2]
  if redis.call('EXISTS', counter) == 0 then
    redis.call('HSET', counter, 'spend', spend, 'held', '0')
    if snap ~= '' then
      redis.call('HSET', counter, 'snap', snap)
    end
    for _, member in ipairs(redis.call('SMEMBERS', parked)) do
      local xact, cost = string.match(member, '^(%d+):(%d+)$')
      if not visible(xact, snap) then
        redis.call('HINCRBY', counter, 'spend', cost)
      end
    end
    redis.call('DEL', parked)
    if ttl ~= '0' then
      redis.call('EXPIRE', counter, ttl)
    end
    created = created + 1
  end
end
return created
