-- The account's rate budget, one row per account and model, shared by every process that
-- reaches this database (Dagster runs, CLI runs, batch collects): DashScope counts RPM/TPM per
-- account and model, across all keys and workspaces, and per second (RPM/60, TPM/60).
-- A call reserves its send time with one conditional UPDATE of its row (db/quota.py): the slot
-- is the later of now and the earliest time the last reservation left for the next request
-- (request spacing) and for the next tokens (token spacing). Times are the server's clock,
-- seconds since the epoch. Plain INSERT/UPDATE only, so it runs on AnalyticDB 6 and 7 alike;
-- the key (account, model) is the distribution key on Greenplum.
CREATE TABLE IF NOT EXISTS {ns}.enrich_rate_budget (
    account      text             NOT NULL,
    model        text             NOT NULL,
    next_request double precision NOT NULL DEFAULT 0,
    next_token   double precision NOT NULL DEFAULT 0,
    last_slot    double precision NOT NULL DEFAULT 0,
    reservations bigint           NOT NULL DEFAULT 0,
    updated_at   timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (account, model)
) /*GREENPLUM DISTRIBUTED BY (account) */;
