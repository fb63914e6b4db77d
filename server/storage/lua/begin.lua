-- begin: read the counters of a RecordSpend and announce its settle.
--
-- KEYS[1]     in-flight settles zset: request id -> deadline (Unix seconds)
-- KEYS[2..]   one counter hash {spend, held, snap} per scope, in scope order
-- ARGV[1]     request id
-- ARGV[2]     deadline: the settle is overdue after it (Unix seconds)
--
-- settle.lua removes the request id. If it never comes (budgetd died between the ledger commit
-- and the settle), reserve and settle hand the id to their caller once the deadline passed
-- (claim_unsettled), who settles it from the ledger.
--
-- Returns states = spend1, held1, ... as decimal strings, nil where missing.

redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return read_states(2)
