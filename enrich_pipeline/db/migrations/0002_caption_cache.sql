-- Captions by image content, model and prompt version: the same image is never paid twice,
-- across rows, users and runs (a re-run after a crash finds what the dead run paid for).
CREATE TABLE IF NOT EXISTS {ns}.enrich_caption_cache (
    content_sha256 text        NOT NULL,
    model          text        NOT NULL,
    prompt_version text        NOT NULL,
    caption        text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (content_sha256, model, prompt_version)
) /*GREENPLUM DISTRIBUTED BY (content_sha256) */;
