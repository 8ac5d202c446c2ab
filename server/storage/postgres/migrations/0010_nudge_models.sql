-- The nudge model registry (SQLite 0013; see there): trained versions and the promoted one, in
-- the database every replica shares. Not per-person: stays on the coordinator when sharded.
CREATE TABLE nudge_models (
    version     bigint PRIMARY KEY,
    create_us   bigint NOT NULL,
    meta        text NOT NULL,
    model       bytea NOT NULL
);

CREATE TABLE nudge_model_promoted (
    slot        integer PRIMARY KEY CHECK (slot = 1),
    version     bigint NOT NULL REFERENCES nudge_models (version),
    promote_us  bigint NOT NULL,
    evaluation  text NOT NULL
);
