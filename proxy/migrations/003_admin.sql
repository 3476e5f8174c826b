-- Admin surface: the audit trail, key rotation, and the daily usage rollup the dashboard reads.

-- Every admin API call (and login attempt), whoever made it and whatever it answered.
CREATE TABLE admin_audit (
    id          bigserial PRIMARY KEY,
    actor       text NOT NULL,          -- 'token:<sha256 prefix>', 'session:<prefix>' or 'anonymous'; never the token
    method      text NOT NULL,
    path        text NOT NULL,
    query       text NOT NULL DEFAULT '',
    body        text NOT NULL DEFAULT '',  -- summary of the JSON/form body, secrets redacted, truncated
    status      integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX admin_audit_at ON admin_audit (at);

-- Key rotation: the replaced key keeps working until revoke_after, then is revoked.
ALTER TABLE api_keys ADD COLUMN revoke_after timestamptz;
CREATE INDEX api_keys_revoke_due ON api_keys (revoke_after) WHERE revoked_at IS NULL AND revoke_after IS NOT NULL;

-- One row per UTC day, user, key, provider, model and tier: what the dashboard and the
-- usage queries read instead of usage_events. Kept current in the usage writer's
-- transaction (proxy.rollup.write_usage) and rebuildable with refresh_rollup.
CREATE TABLE usage_daily (
    day                 date NOT NULL,
    user_id             text NOT NULL,
    key_id              text NOT NULL,
    provider            text NOT NULL,
    model               text NOT NULL,
    tier                text NOT NULL,
    requests            bigint NOT NULL,
    input_tokens        bigint NOT NULL,    -- every prompt token: uncached + cached + cache writes
    cached_input_tokens bigint NOT NULL,
    output_tokens       bigint NOT NULL,
    cost_micro          bigint NOT NULL,
    PRIMARY KEY (day, user_id, key_id, provider, model, tier)
);
CREATE INDEX usage_daily_user ON usage_daily (user_id, day);
CREATE INDEX usage_daily_key ON usage_daily (key_id, day);

INSERT INTO usage_daily
SELECT (created_at AT TIME ZONE 'UTC')::date, user_id, key_id, provider, model, tier, count(*),
       sum(input_tokens + cached_input_tokens + cache_write_tokens), sum(cached_input_tokens),
       sum(output_tokens), sum(cost_micro)
FROM usage_events GROUP BY 1, 2, 3, 4, 5, 6;

-- Figures: tier history per user (paying users at a date) and signups/cancellations by kind.
CREATE INDEX tier_changes_user_time ON tier_changes (user_id, changed_at);
