-- Profiles: encrypted profile versions and feature usage (SQLite 0003). The per-person data
-- keys are not here: they live in the key vault, a database of its own, so that a backup of
-- this one holds ciphertext only and destroying a person's key reaches every backup.

-- Which key vault holds the data keys of this database's profiles (one row; no personal data).
CREATE TABLE profile_vault (
    singleton   integer PRIMARY KEY CHECK (singleton = 1),
    vault_id    text NOT NULL,
    bind_us     bigint NOT NULL
);

CREATE TABLE profile_versions (
    user_id     bigint NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    version     bigint NOT NULL,
    key_id      text NOT NULL,
    nonce       bytea NOT NULL,                 -- 96-bit, random per write
    ciphertext  bytea NOT NULL,                 -- AES-GCM(data key, Profile), tag appended
    device_id   text NOT NULL,                  -- whose write made it ("server": layout)
    create_us   bigint NOT NULL,
    PRIMARY KEY (user_id, version)
);

CREATE TABLE profile_feature_usage (
    user_id     bigint NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    feature     text NOT NULL,
    score       double precision NOT NULL,      -- decayed use count as of ref_us
    ref_us      bigint NOT NULL,
    PRIMARY KEY (user_id, feature)
);
