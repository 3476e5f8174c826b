-- Stripe billing: subscription state on users, processed events, paid invoices, tier changes.

ALTER TABLE users
    ADD COLUMN stripe_customer_id      text UNIQUE,
    ADD COLUMN stripe_subscription_id  text UNIQUE,
    ADD COLUMN subscription_status     text,            -- Stripe's: active, past_due, canceled, ...
    ADD COLUMN cancel_at_period_end    boolean NOT NULL DEFAULT false,
    ADD COLUMN past_due_since          timestamptz,
    ADD COLUMN subscription_synced_at  timestamptz,     -- `created` of the newest subscription event applied
    ADD COLUMN ended_subscriptions     text[] NOT NULL DEFAULT '{}';  -- late events about these change nothing

-- Every Stripe event applied, recorded in the same transaction as its effect.
CREATE TABLE stripe_events (
    id           text PRIMARY KEY,
    type         text NOT NULL,
    created_at   timestamptz NOT NULL,                  -- the event's `created`
    applied_at   timestamptz NOT NULL DEFAULT now()
);

-- Paid invoices: the operator's revenue. Amounts in the invoice currency's minor unit (cents).
CREATE TABLE invoices (
    id               text PRIMARY KEY,                  -- Stripe invoice id; credit grants are keyed on it
    user_id          text NOT NULL REFERENCES users (id),
    subscription_id  text,
    billing_reason   text NOT NULL,
    payment_intent   text,                              -- refunds and disputes find their invoice by it
    tier             text NOT NULL,
    currency         text NOT NULL,
    amount_paid      bigint NOT NULL,
    stripe_fee       bigint NOT NULL DEFAULT 0,
    refunded         bigint NOT NULL DEFAULT 0,
    disputed         bigint NOT NULL DEFAULT 0,
    period_start     timestamptz,
    period_end       timestamptz,
    paid_at          timestamptz NOT NULL
);
CREATE INDEX invoices_paid_at ON invoices (paid_at);
CREATE INDEX invoices_user ON invoices (user_id);
CREATE INDEX invoices_payment_intent ON invoices (payment_intent);

-- Tier changes of every kind, for signups/upgrades/downgrades/churn figures.
CREATE TABLE tier_changes (
    id          bigserial PRIMARY KEY,
    user_id     text NOT NULL REFERENCES users (id),
    from_tier   text,
    to_tier     text NOT NULL,
    kind        text NOT NULL,                          -- signup, upgrade, downgrade, cancel, lapse
    source      text NOT NULL,                          -- stripe event id, admin, cli
    changed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tier_changes_time ON tier_changes (changed_at);
