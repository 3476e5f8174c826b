-- Users, their proxy keys, and the ledger every money movement lands in.

CREATE TABLE users (
    id          text PRIMARY KEY,
    email       text NOT NULL UNIQUE,
    tier        text NOT NULL,
    status      text NOT NULL DEFAULT 'active',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    user_id     text NOT NULL REFERENCES users (id),
    name        text NOT NULL DEFAULT '',
    key_hash    text NOT NULL UNIQUE,       -- sha256 hex of the key; the key itself is never stored
    key_prefix  text NOT NULL,              -- first characters, to recognise a key in listings
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_user ON api_keys (user_id);

-- One row per money movement: grant, charge, void (hold released, amount 0), reset, refund.
-- The sum of amount_micro per user equals the account's balance in Redis.
CREATE TABLE ledger (
    id            text PRIMARY KEY,          -- event id; a replayed event is ignored
    user_id       text NOT NULL,
    kind          text NOT NULL,
    amount_micro  bigint NOT NULL,           -- signed change of the balance, micro-dollars
    balance_micro bigint NOT NULL,           -- balance after this movement
    hold_id       text,
    reason        text,
    created_at    timestamptz NOT NULL
);
CREATE INDEX ledger_user_time ON ledger (user_id, created_at);

-- One row per charged request.
CREATE TABLE usage_events (
    id                  text PRIMARY KEY REFERENCES ledger (id),
    user_id             text NOT NULL,
    key_id              text NOT NULL,
    provider            text NOT NULL,
    model               text NOT NULL,
    tier                text NOT NULL,
    input_tokens        bigint NOT NULL,
    cached_input_tokens bigint NOT NULL,
    cache_write_tokens  bigint NOT NULL,
    output_tokens       bigint NOT NULL,
    reasoning_tokens    bigint NOT NULL,
    cost_micro          bigint NOT NULL,
    estimated           boolean NOT NULL,
    stream              boolean NOT NULL,
    status              integer NOT NULL,
    latency_ms          integer NOT NULL,
    created_at          timestamptz NOT NULL
);
CREATE INDEX usage_user_time ON usage_events (user_id, created_at);
CREATE INDEX usage_time ON usage_events (created_at);
