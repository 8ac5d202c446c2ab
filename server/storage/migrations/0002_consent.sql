-- The consent ledger: every grant and withdrawal, never updated in place.
CREATE TABLE consent_ledger (
    entry_id        INTEGER PRIMARY KEY,
    user_id         INTEGER NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    category        INTEGER NOT NULL,          -- pulsesync.v1.ConsentCategory
    granted         INTEGER NOT NULL,          -- 0 or 1
    policy_version  TEXT NOT NULL,
    device_id       TEXT NOT NULL,             -- where the choice was made ("admin" from the CLI)
    change_us       INTEGER NOT NULL
);
CREATE INDEX consent_by_user ON consent_ledger(user_id, category, entry_id);
