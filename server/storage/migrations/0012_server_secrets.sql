-- Secrets of the server as a whole that every replica must share, e.g. the key that seals page
-- tokens: a token one replica hands out must be good on every other. Kept in the database,
-- which every replica of a deployment shares, rather than in a replica's data directory. Only
-- for secrets whose holder learns nothing the database does not hold already (the page-token
-- key protects positions in listings, not data); keys that guard the data stay out of it.
CREATE TABLE server_secrets (
    name    TEXT PRIMARY KEY,
    secret  BLOB NOT NULL
);
