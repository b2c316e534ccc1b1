-- Batch mode (enrich_pipeline.batch): submissions to DashScope's OpenAI-compatible Batch API.
-- One row per provider batch (a submission that outgrows one file is split into parts, each its
-- own batch), and per item what collecting needs, so that polling and collecting never depend
-- on the process that submitted. The rows a batch works on are held in enrich_claims by the
-- worker `batch:<submission_id>`; a claim that is still there means "not written back yet".
--
-- state (ours):  submitting -> open -> collected
--                submitting -> abandoned  (upload failed, or no batch was created after all)
--                submitting -> rejected   (the API refused the batch: model or region)
--                open       -> rejected   (the batch failed validation: model not supported)
-- status: the provider's, as last polled (validating, in_progress, finalizing, completed,
--         failed, expired, cancelling, cancelled).
CREATE TABLE IF NOT EXISTS {ns}.enrich_batches (
    local_id             text        NOT NULL,
    source_table         text        NOT NULL,
    user_id              text        NOT NULL,
    submission_id        text        NOT NULL,
    part                 integer     NOT NULL,
    worker               text        NOT NULL,
    endpoint             text        NOT NULL,
    model                text        NOT NULL,
    prompt_version       text        NOT NULL,
    base_url             text        NOT NULL,
    caption_embedding    boolean     NOT NULL,
    lines                integer     NOT NULL,
    bytes                bigint      NOT NULL,
    state                text        NOT NULL,
    batch_id             text,
    input_file_id        text,
    output_file_id       text,
    error_file_id        text,
    status               text,
    request_counts       jsonb,
    error                text,
    stats                jsonb,
    collector            text,
    collector_expires_at timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    polled_at            timestamptz,
    finished_at          timestamptz,
    PRIMARY KEY (local_id)
) /*GREENPLUM DISTRIBUTED BY (local_id) */;
CREATE INDEX enrich_batches_state_idx
    ON {ns}.enrich_batches (source_table, state);

-- custom_id: the line whose answer captions the item (rows of one part that share an image
-- share one line, so the same picture is paid once).
CREATE TABLE IF NOT EXISTS {ns}.enrich_batch_items (
    local_id        text  NOT NULL,
    item_id         text  NOT NULL,
    custom_id       text  NOT NULL,
    image           text  NOT NULL,
    content_sha256  text  NOT NULL,
    dominant_colors jsonb NOT NULL,
    PRIMARY KEY (local_id, item_id)
) /*GREENPLUM DISTRIBUTED BY (local_id) */;
