-- Users, devices, pairing codes, events and quarantine.
-- Designed for append: the events table is clustered on (device_pk, seq), which grows at the
-- end for every device, and has one secondary index, for per-user time-range reads.

CREATE TABLE users (
    user_id     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    create_us   INTEGER NOT NULL
);

CREATE TABLE devices (
    device_pk       INTEGER PRIMARY KEY,
    device_id       TEXT NOT NULL UNIQUE,           -- public id, e.g. "dev_3f9c2a..."
    user_id         INTEGER NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    name            TEXT NOT NULL,
    kind            INTEGER NOT NULL,               -- pulsesync.v1.DeviceKind
    token_hash      BLOB NOT NULL UNIQUE,           -- SHA-256 of the bearer token
    pair_us         INTEGER NOT NULL,
    last_seen_us    INTEGER,
    revoke_us       INTEGER,
    clock_offset_us INTEGER NOT NULL DEFAULT 0      -- server clock minus device clock
);
CREATE INDEX devices_by_user ON devices(user_id);

CREATE TABLE pairing_codes (
    code_hash   BLOB PRIMARY KEY,                   -- SHA-256 of the normalized code
    user_id     INTEGER NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    create_us   INTEGER NOT NULL,
    expire_us   INTEGER NOT NULL,
    used_us     INTEGER
);

CREATE TABLE events (
    device_pk   INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    user_id     INTEGER NOT NULL,
    t_us        INTEGER NOT NULL,                   -- corrected (server-clock) event time
    kind        INTEGER NOT NULL,                   -- pulsesync.v1.EventKind
    received_us INTEGER NOT NULL,
    body        BLOB NOT NULL,                      -- serialized pulsesync.v1.Event
    PRIMARY KEY (device_pk, seq)
) WITHOUT ROWID;
CREATE INDEX events_by_user_time ON events(user_id, t_us);

CREATE TABLE quarantine (
    quarantine_id INTEGER PRIMARY KEY,
    user_id     INTEGER NOT NULL,
    device_pk   INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    event_id    TEXT NOT NULL,
    reason      TEXT NOT NULL,
    detail      TEXT NOT NULL,
    received_us INTEGER NOT NULL,
    body        BLOB NOT NULL
);
CREATE INDEX quarantine_by_user ON quarantine(user_id);
