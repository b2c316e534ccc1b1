-- What a batch's lines asked for beyond the model and the prompt version: the answer format
-- (json_schema, json_object, text) and the caption languages ('zh,en'), so that collecting
-- reads the answers as they were asked and caches them under the same key, whatever the
-- collecting process is configured with. Batches recorded before were English text answers.
ALTER TABLE {ns}.enrich_batches ADD COLUMN answer_format text NOT NULL DEFAULT 'text';
ALTER TABLE {ns}.enrich_batches ADD COLUMN languages text NOT NULL DEFAULT 'en';
