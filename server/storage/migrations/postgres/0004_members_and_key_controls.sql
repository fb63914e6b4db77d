-- budgetd schema 4 (issue 5): team members, key controls, per-model budgets, member spend.
--
-- Every column is added with a constant default (or none), which Postgres records in the
-- catalog without rewriting the table, so existing teams, keys and ledger rows are kept as
-- they are and read back with the defaults: no soft budget, no member defaults, no model
-- budgets, not blocked, no user.
--
-- model_max_budget is LiteLLM's per-model budget map, as JSON:
--     {"<model>": {"limit_nanos": "<integer nano-USD as a string>", "duration": "1d"}}
-- The limit is an integer string so that money stays exact whoever reads the JSON (no
-- float anywhere); "" duration = never resets.

ALTER TABLE teams
    ADD COLUMN soft_budget            NUMERIC(30, 9),            -- NULL = none (alerts only)
    ADD COLUMN member_budget          NUMERIC(30, 9),            -- each member's default; NULL = none
    ADD COLUMN member_budget_duration text NOT NULL DEFAULT '',
    ADD COLUMN member_rpm_limit       bigint,
    ADD COLUMN member_tpm_limit       bigint,
    ADD COLUMN model_max_budget       jsonb NOT NULL DEFAULT '{}';

ALTER TABLE api_keys
    ADD COLUMN blocked          boolean NOT NULL DEFAULT false,
    ADD COLUMN soft_budget      NUMERIC(30, 9),
    ADD COLUMN rpm_limit        bigint,
    ADD COLUMN tpm_limit        bigint,
    ADD COLUMN model_max_budget jsonb NOT NULL DEFAULT '{}';

-- One row per user of a team; NULL fields fall back to the team's member_* defaults
-- (budget_duration NULL = the team's member_budget_duration, '' = never resets).
CREATE TABLE team_members (
    team_id         text COLLATE "C" NOT NULL REFERENCES teams (team_id),
    user_id         text COLLATE "C" NOT NULL,
    max_budget      NUMERIC(30, 9),
    budget_duration text,
    rpm_limit       bigint,
    tpm_limit       bigint,
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (team_id, user_id)               -- also serves listing a team's members
);

-- The team member who spent ('' = none: a key without a user).
ALTER TABLE spend_ledger ADD COLUMN user_id text NOT NULL DEFAULT '';

-- Rebuilding a member's counter sums (team_id, user_id) over a window; a per-model budget
-- sums (key_id, model) or (team_id, model). Building these locks ledger writes while they
-- run (seconds per million rows).
CREATE INDEX spend_ledger_team_user_admitted_idx ON spend_ledger (team_id, user_id, admitted_at);
CREATE INDEX spend_ledger_key_model_admitted_idx ON spend_ledger (key_id, model, admitted_at);
CREATE INDEX spend_ledger_team_model_admitted_idx ON spend_ledger (team_id, model, admitted_at);

-- Holds of member and model scopes (server/storage/postgres_counters.py): changes to
-- budget_holds for issue 5 go below this line.
-- Holds on a member's budget (member scopes) sit in budget_holds like key and team holds.
ALTER TABLE budget_holds DROP CONSTRAINT budget_holds_scope_kind_check;
ALTER TABLE budget_holds ADD CONSTRAINT budget_holds_scope_kind_check
    CHECK (scope_kind IN ('team', 'key', 'member'));
