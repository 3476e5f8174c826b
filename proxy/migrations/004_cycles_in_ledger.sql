-- What `costproxy ledger check` and `ledger rebuild` need from Postgres alone.
--
-- stream_order: where the entry stands in its shard's ledger stream (Redis's own entry id,
-- ms * 1,000,000 + sequence). One account lives in one shard, so it orders an account's
-- movements exactly as Redis applied them, whatever the clocks of the processes that
-- wrote them said.
-- cycle_start / cycle_end / auto_renew: set on the entries that start a cycle (an account
-- opened, a cycle renewed or started by an invoice), so a lost account's cycle can be
-- restored. Additive: the previous release keeps working while this one rolls out.
ALTER TABLE ledger
    ADD COLUMN stream_order bigint,
    ADD COLUMN cycle_start  timestamptz,
    ADD COLUMN cycle_end    timestamptz,
    ADD COLUMN auto_renew   boolean;
CREATE INDEX ledger_user_order ON ledger (user_id, stream_order);
