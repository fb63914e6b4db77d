-- budgetd embedded schema 4 (issue 5): team members, key controls, per-model budgets and
-- the user of each ledger row. Existing rows read back with the defaults.
-- model_max_budget: {"<model>": {"limit_nanos": "<integer nano-USD>", "duration": "1d"}}.
ALTER TABLE teams ADD COLUMN soft_budget_nanos INTEGER;
ALTER TABLE teams ADD COLUMN member_budget_nanos INTEGER;
ALTER TABLE teams ADD COLUMN member_budget_duration TEXT NOT NULL DEFAULT '';
ALTER TABLE teams ADD COLUMN member_rpm_limit INTEGER;
ALTER TABLE teams ADD COLUMN member_tpm_limit INTEGER;
ALTER TABLE teams ADD COLUMN model_max_budget TEXT NOT NULL DEFAULT '{}';

ALTER TABLE api_keys ADD COLUMN blocked INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN soft_budget_nanos INTEGER;
ALTER TABLE api_keys ADD COLUMN rpm_limit INTEGER;
ALTER TABLE api_keys ADD COLUMN tpm_limit INTEGER;
ALTER TABLE api_keys ADD COLUMN model_max_budget TEXT NOT NULL DEFAULT '{}';

-- NULL fields fall back to the team's member_* defaults (budget_duration NULL: the team's).
CREATE TABLE team_members (
    team_id TEXT NOT NULL REFERENCES teams (team_id),
    user_id TEXT NOT NULL,
    max_budget_nanos INTEGER,
    budget_duration TEXT,
    rpm_limit INTEGER,
    tpm_limit INTEGER,
    created_at REAL NOT NULL,
    PRIMARY KEY (team_id, user_id)
);

ALTER TABLE spend_ledger ADD COLUMN user_id TEXT NOT NULL DEFAULT '';

CREATE INDEX spend_ledger_team_user ON spend_ledger (team_id, user_id, admitted_at);
CREATE INDEX spend_ledger_key_model ON spend_ledger (key_id, model, admitted_at);
CREATE INDEX spend_ledger_team_model ON spend_ledger (team_id, model, admitted_at);
