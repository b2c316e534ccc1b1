-- The spend ledger: what each run paid the provider, as estimated when it ended, so that the
-- table-wide overview (the items_table asset) can state spend to date. One row per (run, user):
-- a Dagster run records each user's share, an `enrich-captions` run one row for what it
-- covered (user_id '' when it covered every user), a collected batch one row for its user.
-- run_id: the Dagster run id, `enrich-captions:<id>` or `batch:<local id>`; command says which.
-- cost is NULL when a model used has no price (the tokens are still counted); currency is the
-- price table's (never add CNY to USD: sums are by currency). No secret is ever stored here:
-- model names, token counts and ids only.
CREATE TABLE IF NOT EXISTS {ns}.enrich_spend (
    source_table      text             NOT NULL,
    run_id            text             NOT NULL,
    user_id           text             NOT NULL,
    command           text             NOT NULL,
    recorded_at       timestamptz      NOT NULL DEFAULT now(),
    models            text             NOT NULL,
    prompt_tokens     bigint           NOT NULL DEFAULT 0,
    completion_tokens bigint           NOT NULL DEFAULT 0,
    embedding_tokens  bigint           NOT NULL DEFAULT 0,
    cost              double precision,
    currency          text,
    PRIMARY KEY (source_table, run_id, user_id)
) /*GREENPLUM DISTRIBUTED BY (run_id) */;
