-- budgetd schema 2: exact counters through Redis losses, and counters on Postgres alone.

-- The transaction that wrote each ledger row. A counter rebuilt from the ledger remembers
-- the snapshot it summed in; a row's transaction tells whether the row was in that sum, so a
-- request caught between its ledger insert and its counter update is counted exactly once
-- (see server/storage/snapshots.py). The column is added without a default first, so the
-- existing rows are not rewritten (they keep NULL: "not known to be in any sum"), and the
-- default then fills it for every new row.
ALTER TABLE spend_ledger ADD COLUMN xact bigint;
ALTER TABLE spend_ledger ALTER COLUMN xact SET DEFAULT (pg_current_xact_id()::text::bigint);

-- Holds when counters live in Postgres (Redis down and budgetd.redis_down: postgres): one
-- row per reservation and counter it holds on. Spend itself is never stored here: it is the
-- ledger's sum over the counter's window.
CREATE TABLE budget_holds (
    reservation_id text NOT NULL,
    counter_id     text NOT NULL,               -- kind:scope id:duration:window start
    team_id        text COLLATE "C" NOT NULL,
    scope_kind     text NOT NULL CHECK (scope_kind IN ('team', 'key')),
    scope_id       text NOT NULL,
    window_start   timestamptz NOT NULL,
    amount         NUMERIC(30, 9) NOT NULL CHECK (amount >= 0),
    expires_at     timestamptz NOT NULL,
    PRIMARY KEY (reservation_id, counter_id)
);

-- "held" of a counter sums its unexpired holds; expired holds are purged per team.
CREATE INDEX budget_holds_counter_idx ON budget_holds (counter_id, expires_at);
CREATE INDEX budget_holds_team_expiry_idx ON budget_holds (team_id, expires_at);
