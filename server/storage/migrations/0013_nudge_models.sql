-- The nudge model registry, kept in the database rather than in files of one server's data
-- directory (DATA_DIR/nudge_models before): every process over this database (the server, or
-- every replica of a deployment, and `pulsesync nudges train|evaluate|promote`) sees the same
-- versions and the same promoted one. Names nobody: models are trained on consenting people's
-- decisions, and a later withdrawal leaves out of later models, not out of this one.
CREATE TABLE nudge_models (
    version     INTEGER PRIMARY KEY,        -- 1, 2, ... ("model-v0001"), never reused
    create_us   INTEGER NOT NULL,           -- when it was saved (UTC)
    meta        TEXT NOT NULL,              -- JSON: actions, columns, send threshold, training, evaluation
    model       BLOB NOT NULL               -- the LightGBM boosters (encoding: server/nudges/registry.py)
);

-- The promoted version, the one servers decide with: at most one row.
CREATE TABLE nudge_model_promoted (
    slot        INTEGER PRIMARY KEY CHECK (slot = 1),
    version     INTEGER NOT NULL REFERENCES nudge_models(version),
    promote_us  INTEGER NOT NULL,           -- UTC; a server reloads when (version, promote_us) changes
    evaluation  TEXT NOT NULL               -- JSON: the evaluation it was promoted on
);
