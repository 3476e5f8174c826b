-- The subscriber portal (/portal/): single-use sign-in links and browser sessions.
-- Neither table holds a secret: only SHA-256 digests of the link tokens and session ids.
-- (portal_secret holds the key CSRF tokens are derived with, which signs nobody in.)

-- One row per sign-in link sent, whether or not the address belongs to a user yet (the
-- first sign-in creates the user). Rows also count requests for the rate limits.
CREATE TABLE portal_sign_ins (
    token_hash  text PRIMARY KEY,           -- sha256 hex of the token in the link
    email       text NOT NULL,              -- normalised (trimmed, lower case)
    client      text NOT NULL,              -- the requesting client's address (an IPv6 one's /64)
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz                 -- set once: a link signs in one browser
);
CREATE INDEX portal_sign_ins_email ON portal_sign_ins (email, created_at);
CREATE INDEX portal_sign_ins_client ON portal_sign_ins (client, created_at);

-- One row per signed-in browser. `id` is public (listed, revoked by it); the cookie holds
-- a separate secret whose digest is `secret_hash`.
CREATE TABLE portal_sessions (
    id            text PRIMARY KEY,
    secret_hash   text NOT NULL UNIQUE,
    user_id       text NOT NULL REFERENCES users (id),
    user_agent    text NOT NULL DEFAULT '',
    client        text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL,
    last_seen_at  timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    revoked_at    timestamptz
);
CREATE INDEX portal_sessions_user ON portal_sessions (user_id, created_at);

-- One row per Stripe-backed portal call (checkout, preview, plan change, customer
-- portal) within the last minute, for the per-user rate limit.
CREATE TABLE portal_stripe_calls (
    user_id     text NOT NULL REFERENCES users (id),
    created_at  timestamptz NOT NULL
);
CREATE INDEX portal_stripe_calls_user ON portal_stripe_calls (user_id, created_at);

-- The HMAC key of the portal's CSRF tokens: drawn by the first process that needs it,
-- shared by every replica. Deleting the row (and restarting) rotates it.
CREATE TABLE portal_secret (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    secret  text NOT NULL
);

-- An address has one account whatever its case, and sign-in finds it by that. (Upgrading
-- fails here if two users' addresses differ only in case: merge or rename one first.)
CREATE UNIQUE INDEX users_email_lower ON users (lower(email));

-- The hosted page of the invoice whose payment failed last, for the portal's banner.
ALTER TABLE users ADD COLUMN failed_invoice_url text;
