-- The profile key vault, in a database of its own (--key-vault postgresql://...): each person's
-- data key, wrapped by a key-encryption key that is never stored here. Kept apart from the main
-- database so it can have a much shorter backup retention: destroying a person's row (and the
-- backups that held it aging out) leaves their profile ciphertext unreadable in every backup of
-- the main database. Same layout as the SQLite vault file (server/storage/sqlite/keys.py).

CREATE TABLE vault_meta (
    name    text PRIMARY KEY,
    value   text NOT NULL
);
-- The vault's identity, random: the main database records which vault holds its keys.
INSERT INTO vault_meta (name, value) VALUES
    ('format', 'pulsesync-keyvault-v1'),
    ('vault_id', 'vault_' || replace(gen_random_uuid()::text, '-', ''));

CREATE TABLE data_keys (
    user_id     bigint PRIMARY KEY,     -- the person (an id of the main database)
    key_id      text NOT NULL,          -- public id of the data key, bound in every AAD
    kek_id      text NOT NULL,          -- the key-encryption key that wraps it
    wrapped_key bytea NOT NULL,         -- nonce || AES-GCM(KEK, data key), AAD user + key id
    create_us   bigint NOT NULL,
    wrap_us     bigint NOT NULL         -- last (re-)wrap, e.g. by `keys rotate`
);
