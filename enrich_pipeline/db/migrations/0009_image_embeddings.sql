-- Image embeddings (ENRICH_IMAGE_EMBEDDING_MODEL): one vector per item, of the image the run
-- loaded and downscaled for the caption, made by a multimodal embedding model that puts texts
-- and images in one space (so a text query and a picture both find it). Beside the caption
-- vectors, not in their table: the two are different models' spaces and lengths, searched and
-- indexed apart. image_digest is md5 of the image value the vector was made from (as the
-- caption's caption_image_digest), so a vector whose image changed is known stale and never
-- ranked as if it described the new image; content_sha256 is the bytes', which lets a copy of
-- the same picture reuse a vector instead of paying for it again.
CREATE TABLE IF NOT EXISTS {ns}.enrich_image_embeddings (
    source_table   text        NOT NULL,
    item_id        text        NOT NULL,
    user_id        text        NOT NULL,
    model          text        NOT NULL,
    dimensions     integer     NOT NULL,
    embedding      real[]      NOT NULL,
    image_digest   text        NOT NULL,
    content_sha256 text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_table, item_id)
) /*GREENPLUM DISTRIBUTED BY (item_id) */;
CREATE INDEX enrich_image_embeddings_user_idx
    ON {ns}.enrich_image_embeddings (source_table, user_id);
