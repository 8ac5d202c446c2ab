-- Profiles: per-user data keys (wrapped by the key-encryption key), encrypted profile
-- versions, and the recency-weighted feature usage behind the adaptive layout.
-- Every table has a user_id column, so erasure deletes a person's rows generically.

CREATE TABLE profile_keys (
    user_id     INTEGER PRIMARY KEY REFERENCES users(user_id) ON DELETE CASCADE,
    key_id      TEXT NOT NULL,                  -- public id of the data key (bound in AAD)
    kek_id      TEXT NOT NULL,                  -- which key-encryption key wraps it
    wrapped_key BLOB NOT NULL,                  -- nonce || AES-GCM(KEK, data key)
    create_us   INTEGER NOT NULL,
    wrap_us     INTEGER NOT NULL                -- last (re-)wrap, e.g. by `keys rotate`
);

-- Appended once per version; a version is never rewritten. Clustered on (user, version).
CREATE TABLE profile_versions (
    user_id     INTEGER NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    version     INTEGER NOT NULL,
    key_id      TEXT NOT NULL,
    nonce       BLOB NOT NULL,                  -- 96-bit, random per write
    ciphertext  BLOB NOT NULL,                  -- AES-GCM(data key, Profile), tag appended
    device_id   TEXT NOT NULL,                  -- whose write made it ("server": layout)
    create_us   INTEGER NOT NULL,
    PRIMARY KEY (user_id, version)
) WITHOUT ROWID;

CREATE TABLE profile_feature_usage (
    user_id     INTEGER NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    feature     TEXT NOT NULL,
    score       REAL NOT NULL,                  -- decayed use count as of ref_us
    ref_us      INTEGER NOT NULL,
    PRIMARY KEY (user_id, feature)
) WITHOUT ROWID;
