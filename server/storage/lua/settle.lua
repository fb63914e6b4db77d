-- settle: once per request id, release the reservation's hold and add the cost to each scope.
--
-- KEYS[1]     holds hash:  reservation id -> JSON [amount, counter key, counter key, ...]
-- KEYS[2]     hold expiry zset: reservation id -> expiry (Unix seconds)
-- KEYS[3]     dedupe marker of the request id
-- KEYS[4..]   one counter hash {spend, held} per scope, in scope order
-- ARGV[1]     now (Unix seconds)
-- ARGV[2]     reservation id ("" = no hold to release)
-- ARGV[3]     cost (integer nano-USD, decimal)
-- ARGV[4]     dedupe marker TTL (whole seconds, >= 1)
--
-- Returns {applied (1 | 0), states}: states = spend1, held1, ... as decimal strings, nil
-- where the counter is missing (skipped: its spend is in the ledger and returns on rebuild).

purge(KEYS[1], KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {0, read_states(4)}
end
redis.call('SET', KEYS[3], '1', 'EX', ARGV[4])
if ARGV[2] ~= '' then
  release_hold(KEYS[1], KEYS[2], ARGV[2])
end
for i = 4, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('HINCRBY', KEYS[i], 'spend', ARGV[3])
  end
end
return {1, read_states(4)}
