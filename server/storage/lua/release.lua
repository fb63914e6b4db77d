-- release: drop a hold without spending.
--
-- KEYS[1]     holds hash:  reservation id -> JSON [amount, counter key, counter key, ...]
-- KEYS[2]     hold expiry zset: reservation id -> expiry (Unix seconds)
-- ARGV[1]     now (Unix seconds)
-- ARGV[2]     reservation id
--
-- Returns 1 when there was a hold (not yet expired), else 0.

purge(KEYS[1], KEYS[2], ARGV[1])
if release_hold(KEYS[1], KEYS[2], ARGV[2]) then
  return 1
end
return 0
