-- Tables the pipeline owns, beside the user's items table. Keys carry the source table so that
-- two items tables in one namespace never collide. Embeddings are real[] because that is what
-- AnalyticDB's vector index works on; with pgvector present, search casts.
CREATE TABLE IF NOT EXISTS {ns}.enrich_embeddings (
    source_table   text        NOT NULL,
    item_id        text        NOT NULL,
    user_id        text        NOT NULL,
    model          text        NOT NULL,
    dimensions     integer     NOT NULL,
    embedding      real[]      NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_table, item_id)
) /*GREENPLUM DISTRIBUTED BY (item_id) */;
CREATE INDEX enrich_embeddings_user_idx
    ON {ns}.enrich_embeddings (source_table, user_id);

-- The failure ledger: one row per failing item, attempts counted, the last error kept.
CREATE TABLE IF NOT EXISTS {ns}.enrich_failures (
    source_table    text        NOT NULL,
    item_id         text        NOT NULL,
    user_id         text        NOT NULL,
    attempts        integer     NOT NULL DEFAULT 1,
    permanent       boolean     NOT NULL DEFAULT false,
    error_code      text        NOT NULL,
    last_error      text        NOT NULL,
    run_id          text,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_table, item_id)
) /*GREENPLUM DISTRIBUTED BY (item_id) */;
CREATE INDEX enrich_failures_user_idx
    ON {ns}.enrich_failures (source_table, user_id);

-- Claims with a lease, so that two runs for the same user never work on the same row and a
-- killed run's rows come back once its lease expires.
CREATE TABLE IF NOT EXISTS {ns}.enrich_claims (
    source_table text        NOT NULL,
    item_id      text        NOT NULL,
    user_id      text        NOT NULL,
    worker       text        NOT NULL,
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (source_table, item_id)
) /*GREENPLUM DISTRIBUTED BY (item_id) */;
