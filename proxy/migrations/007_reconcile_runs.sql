-- Reconciliations with the providers' own reports and with Stripe, one row per run that compared
-- something: the worker's run of one settled day per provider, and every `costproxy reconcile`
-- run (any source, any range of days). A run that could not read a report stores nothing.
-- The admin dashboard shows the last row of each source, whoever ran it; the worker counts
-- only its own runs of a day when it decides whether that day is done.
CREATE TABLE reconcile_runs (
    id            bigserial PRIMARY KEY,
    source        text NOT NULL,            -- openai, anthropic, stripe
    ran_by        text NOT NULL CHECK (ran_by IN ('worker', 'cli')),  -- the worker, or costproxy reconcile
    period_start  date NOT NULL,
    period_end    date NOT NULL,            -- inclusive
    tolerance     numeric NOT NULL,         -- the tolerance it was judged by: RECONCILE_TOLERANCE, 0 for stripe
    exceeds       boolean NOT NULL,         -- a difference beyond the tolerance
    ratios        jsonb NOT NULL,           -- largest share per kind: decimal string, or null when unbounded
    report        jsonb NOT NULL,           -- Reconciliation.to_json()
    ran_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reconcile_runs_source_ran ON reconcile_runs (source, ran_at DESC);
CREATE INDEX reconcile_runs_source_period ON reconcile_runs (source, ran_by, period_start, period_end);
