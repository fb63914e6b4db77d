-- budgetd embedded schema 3: spend reports select ledger rows by admitted_at across teams.
CREATE INDEX IF NOT EXISTS spend_ledger_admitted ON spend_ledger (admitted_at);
