-- budgetd schema 3: spend reports (GetSpend, /global/spend/report) select ledger rows by
-- admitted_at across every team; without this index each report scans the whole ledger.
-- The existing (team_id, admitted_at) and (key_id, admitted_at) indexes serve per-team and
-- per-key reports. Building it locks ledger writes while it runs (seconds per million rows).
CREATE INDEX IF NOT EXISTS spend_ledger_admitted_idx ON spend_ledger (admitted_at);
