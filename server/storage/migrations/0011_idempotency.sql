-- First answers of mutating calls that carried an AIP-155 request_id, so that a retry gets the
-- same answer instead of a second effect. A row is found by its lookup_key, derived from the
-- request_id with the method and the caller's scope (device, or pairing code for PairDevice);
-- the answer is sealed under a key derived from the request_id too, which the server does not
-- keep: the table alone yields no token and no personal data. Rows live for the retry window
-- (expire_us) and go with the person on erasure (user_id). Export shows a person which answers
-- are kept (method and times); the derived columns are named so that export omits them.
CREATE TABLE idempotency_records (
    lookup_key   BLOB PRIMARY KEY,
    user_id      INTEGER,                   -- no foreign key, as in events: erasure deletes by user_id
    method       TEXT NOT NULL,             -- e.g. "DeviceService.PairDevice"
    request_hash BLOB NOT NULL,             -- keyed MAC of the request without its request_id
    nonce        BLOB NOT NULL,
    ciphertext   BLOB NOT NULL,             -- the serialized response, AES-256-GCM
    create_us    INTEGER NOT NULL,
    expire_us    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX idempotency_records_by_expiry ON idempotency_records(expire_us);
CREATE INDEX idempotency_records_by_user ON idempotency_records(user_id);
