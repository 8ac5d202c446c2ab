-- Secrets every replica must share (SQLite 0012; see there). Not per-person: stays on the
-- coordinator when sharded.
CREATE TABLE server_secrets (
    name    text PRIMARY KEY,
    secret  bytea NOT NULL
);
