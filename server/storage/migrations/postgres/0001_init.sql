-- budgetd schema 1: teams, hashed API keys, the append-only spend ledger, settings.
--
-- Money is NUMERIC(30, 9): exact USD down to the nano-USD that budgetd counts in.
-- Ids that are listed in order (team_id) use COLLATE "C" so the order is the code-point
-- order that Python and SQLite use, whatever the database's default collation is.

CREATE TABLE teams (
    team_id         text COLLATE "C" PRIMARY KEY,
    team_alias      text NOT NULL,
    max_budget      NUMERIC(30, 9),             -- NULL = unlimited
    budget_duration text NOT NULL DEFAULT '',   -- '' = never resets
    tpm_limit       bigint,
    rpm_limit       bigint,
    models          text[] NOT NULL DEFAULT '{}',
    metadata        jsonb NOT NULL DEFAULT '{}',
    blocked         boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL
);

CREATE TABLE api_keys (
    key_id          text PRIMARY KEY,
    key_hash        text NOT NULL UNIQUE,       -- SHA-256 hex; the plaintext is never stored
    key_prefix      text,
    team_id         text COLLATE "C" NOT NULL REFERENCES teams (team_id),
    key_alias       text,
    max_budget      NUMERIC(30, 9),             -- NULL = unlimited
    budget_duration text NOT NULL DEFAULT '',
    expires_at      timestamptz,
    models          text[],
    user_id         text,
    revoked_at      timestamptz,
    created_at      timestamptz NOT NULL
);

-- Without it every check of the foreign key (and listing a team's keys) scans api_keys.
CREATE INDEX api_keys_team_id_idx ON api_keys (team_id);

-- Append-only: one row per settled request; request_id makes RecordSpend idempotent.
CREATE TABLE spend_ledger (
    request_id        text PRIMARY KEY,
    team_id           text COLLATE "C" NOT NULL,
    key_id            text NOT NULL,
    cost              NUMERIC(30, 9) NOT NULL CHECK (cost >= 0),
    admitted_at       timestamptz NOT NULL,     -- picks the windows the cost is charged to
    recorded_at       timestamptz NOT NULL,
    reservation_id    text,
    model             text,
    prompt_tokens     bigint,
    completion_tokens bigint,
    metadata          jsonb
);

-- Rebuilding a counter sums one scope's spend over one window.
CREATE INDEX spend_ledger_team_admitted_idx ON spend_ledger (team_id, admitted_at);
CREATE INDEX spend_ledger_key_admitted_idx ON spend_ledger (key_id, admitted_at);

CREATE TABLE budgetd_settings (
    name  text PRIMARY KEY,
    value text NOT NULL
);
