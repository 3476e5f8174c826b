-- Versioned prices and receipts.
--
-- price_versions: every distinct pricing.yaml content a process loaded, stored the first
-- time one loads it (in the background: the request path never waits on Postgres). The
-- version is the first 16 hex digits of the content's SHA-256.
CREATE TABLE price_versions (
    version          text PRIMARY KEY,
    content          text NOT NULL,          -- the file as loaded (UTF-8)
    models           integer NOT NULL,       -- models priced, over every provider
    first_loaded_at  timestamptz NOT NULL,   -- the earliest load any process reported
    last_loaded_at   timestamptz NOT NULL    -- the latest: the newest is the current version
);

-- What a receipt needs beyond the usage row: the price version the request was admitted
-- under, the service tier it was charged at (served, else asked for: which price set applied), and the 1-hour cache
-- writes among cache_write_tokens (priced apart). Null / 0 on rows written before this.
ALTER TABLE usage_events
    ADD COLUMN price_version          text,
    ADD COLUMN service_tier           text,
    ADD COLUMN cache_write_1h_tokens  bigint NOT NULL DEFAULT 0;
