-- Answers by image content and by everything that shapes them: the model, the prompt version,
-- the answer format (json_schema, json_object, text) and the caption languages (in the
-- configured order, e.g. 'zh,en'). A change of any of them is a different answer, never a
-- cache hit. `caption` is the first language's caption; `answer` the whole structured answer
-- as JSON (an object of "captions", "style_tags", "object_tags", "tags_source"),
-- NULL for an entry that holds a caption only (tags then come from the keyword rules).
CREATE TABLE IF NOT EXISTS {ns}.enrich_answer_cache (
    content_sha256 text        NOT NULL,
    model          text        NOT NULL,
    prompt_version text        NOT NULL,
    answer_format  text        NOT NULL,
    languages      text        NOT NULL,
    caption        text        NOT NULL,
    answer         text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (content_sha256, model, prompt_version, answer_format, languages)
) /*GREENPLUM DISTRIBUTED BY (content_sha256) */;

-- The captions cached before: plain English text answers. The offline provider's entries are
-- left behind: they were never a model's answer (and some were wrong, from a recognizer that
-- was not thread-safe), and offline answers are no longer cached at all.
INSERT INTO {ns}.enrich_answer_cache
    (content_sha256, model, prompt_version, answer_format, languages, caption, created_at)
SELECT content_sha256, model, prompt_version, 'text', 'en', caption, created_at
FROM {ns}.enrich_caption_cache WHERE model <> 'offline-synthetic';

DROP TABLE {ns}.enrich_caption_cache;
