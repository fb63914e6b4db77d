-- budgetd embedded default: teams, hashed keys and the append-only spend ledger.
-- Money is INTEGER nano-USD (exact 64-bit); instants are REAL Unix seconds.
CREATE TABLE teams (
    team_id TEXT PRIMARY KEY,
    team_alias TEXT NOT NULL,
    max_budget_nanos INTEGER,
    budget_duration TEXT NOT NULL DEFAULT '',
    tpm_limit INTEGER,
    rpm_limit INTEGER,
    models TEXT NOT NULL DEFAULT '[]',
    metadata TEXT NOT NULL DEFAULT '{}',
    blocked INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);

CREATE TABLE api_keys (
    key_id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    key_prefix TEXT NOT NULL DEFAULT '',
    team_id TEXT NOT NULL REFERENCES teams (team_id),
    key_alias TEXT NOT NULL DEFAULT '',
    max_budget_nanos INTEGER,
    budget_duration TEXT NOT NULL DEFAULT '',
    expires_at REAL,
    models TEXT NOT NULL DEFAULT '[]',
    user_id TEXT NOT NULL DEFAULT '',
    revoked_at REAL,
    created_at REAL NOT NULL
);

CREATE TABLE spend_ledger (
    request_id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    cost_nanos INTEGER NOT NULL CHECK (cost_nanos >= 0),
    admitted_at REAL NOT NULL,
    recorded_at REAL NOT NULL,
    reservation_id TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    metadata TEXT NOT NULL DEFAULT '{}'
);

CREATE INDEX spend_ledger_team ON spend_ledger (team_id, admitted_at);
CREATE INDEX spend_ledger_key ON spend_ledger (key_id, admitted_at);

CREATE TABLE budgetd_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
