-- Batch mode and stale rows: what a stale row's claim read (the caption being replaced and the
-- image digest recorded with it), so that collecting, maybe a day later, replaces the caption
-- only if both are still there (someone else's newer caption wins), as an online run does.
-- NULL for a pending row (no caption to replace), and for items recorded before.
ALTER TABLE {ns}.enrich_batch_items ADD COLUMN replaces text;
ALTER TABLE {ns}.enrich_batch_items ADD COLUMN replaces_digest text;
-- What a collected batch showed of its answer format: the format it was answered well in
-- (answer_format itself), or the one below it when the model refused the format or answered
-- mostly malformed JSON. NULL: the batch told nothing (no answer at all). The next submission
-- for the model starts from what these say (providers/formats.batch_format), unless
-- ENRICH_ANSWER_FORMAT names a format.
ALTER TABLE {ns}.enrich_batches ADD COLUMN next_format text;
