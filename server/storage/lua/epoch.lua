-- epoch: the team's epoch token, created when missing (see init.lua and forget_teams).
--
-- KEYS[1]     the team's epoch
-- ARGV[1]     a fresh random token, used if there is none
-- ARGV[2]     its TTL in whole seconds
--
-- Returns the token.

local token = redis.call('GET', KEYS[1])
if not token then
  token = ARGV[1]
  redis.call('SET', KEYS[1], token, 'EX', ARGV[2])
end
return token
