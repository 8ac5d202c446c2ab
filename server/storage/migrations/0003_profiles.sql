-- Profiles: encrypted profile versions, and the recency-weighted feature usage behind the
-- adaptive layout. Every per-person table has a user_id column, so erasure deletes a person's
-- rows generically.
--
-- The per-person data keys are NOT here: they live in the key vault (DATA_DIR/keyvault.db,
-- server/profiles/vault.py), so that a backup of this database holds ciphertext only and
-- erasing a person's key reaches every backup. Databases created before kept them in a
-- `profile_keys` table; the profile store moves those rows to the vault on first start.

-- Which key vault holds the data keys of this database's profiles (one row; no personal data).
CREATE TABLE profile_vault (
    singleton   INTEGER PRIMARY KEY CHECK (singleton = 1),
    vault_id    TEXT NOT NULL,                  -- the vault's random id (vault_meta.vault_id)
    bind_us     INTEGER NOT NULL
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
