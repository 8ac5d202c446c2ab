-- First answers of mutating calls that carried an AIP-155 request_id (SQLite 0011; see there
-- and server/idempotency.py). A retry finds its row by lookup_key alone, derived from the
-- request_id, the method and the caller's scope, before the server knows anything else about
-- the call; so the key is global, like devices' token hashes (docs/scaling.md: a reference to
-- every shard when sharded, which random keys make cheap). user_id is kept for erasure.
CREATE TABLE idempotency_records (
    lookup_key      bytea PRIMARY KEY,
    user_id         bigint,
    method          text NOT NULL,
    request_hash    bytea NOT NULL,
    nonce           bytea NOT NULL,
    ciphertext      bytea NOT NULL,
    create_us       bigint NOT NULL,
    expire_us       bigint NOT NULL
);
CREATE INDEX idempotency_records_by_expiry ON idempotency_records (expire_us);
CREATE INDEX idempotency_records_by_user ON idempotency_records (user_id);
