-- pulsesync: rebuilds tables
-- A person's user_id and a device's device_pk are never given out again. Without
-- AUTOINCREMENT, SQLite gives a new row the largest id in the table plus one, so the ids of
-- the person (or device) erased last went to the next one paired: state still keyed by the
-- old id (an erasure's hooks and late-row sweep running after its commit, a cut-off signal,
-- an in-memory cache) would then reach a different person. PostgreSQL's identity columns
-- never reuse a value. (Ids erased before this migration, above the largest one left, cannot
-- be known and may still be given out once.)
--
-- SQLite cannot add AUTOINCREMENT to a column: each table is rebuilt (create, copy, drop,
-- rename; https://www.sqlite.org/lang_altertable.html#otheralter), with foreign keys off while
-- the migration runs and checked before it commits (storage/db.py, REBUILD_MARK). The other
-- tables' references name `users` and `devices` and hold on to the rebuilt ones.

CREATE TABLE users_rebuilt (
    user_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    create_us   INTEGER NOT NULL
);
INSERT INTO users_rebuilt (user_id, name, create_us) SELECT user_id, name, create_us FROM users;
DROP TABLE users;
ALTER TABLE users_rebuilt RENAME TO users;

CREATE TABLE devices_rebuilt (
    device_pk       INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id       TEXT NOT NULL UNIQUE,           -- public id, e.g. "dev_3f9c2a..."
    user_id         INTEGER NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    name            TEXT NOT NULL,
    kind            INTEGER NOT NULL,               -- pulsesync.v1.DeviceKind
    token_hash      BLOB NOT NULL UNIQUE,           -- SHA-256 of the bearer token
    pair_us         INTEGER NOT NULL,
    last_seen_us    INTEGER,
    revoke_us       INTEGER,
    clock_offset_us INTEGER NOT NULL DEFAULT 0,     -- server clock minus device clock
    token_issue_us  INTEGER,
    prev_token_hash BLOB,
    prev_token_expire_us INTEGER,
    ack_watermark   INTEGER NOT NULL DEFAULT 0
);
INSERT INTO devices_rebuilt (
    device_pk, device_id, user_id, name, kind, token_hash, pair_us, last_seen_us, revoke_us,
    clock_offset_us, token_issue_us, prev_token_hash, prev_token_expire_us, ack_watermark
)
SELECT
    device_pk, device_id, user_id, name, kind, token_hash, pair_us, last_seen_us, revoke_us,
    clock_offset_us, token_issue_us, prev_token_hash, prev_token_expire_us, ack_watermark
FROM devices;
DROP TABLE devices;
ALTER TABLE devices_rebuilt RENAME TO devices;
CREATE INDEX devices_by_user ON devices(user_id);
CREATE UNIQUE INDEX devices_by_prev_token ON devices(prev_token_hash)
    WHERE prev_token_hash IS NOT NULL;
