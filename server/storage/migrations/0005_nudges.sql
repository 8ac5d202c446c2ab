-- Nudges: every decision the policy made (with the exact probabilities and the features it
-- used), the nudges sent, the feedback devices reported, and the measured outcomes.
-- Every table has a user_id column: erasure deletes by it generically.

CREATE TABLE nudge_decisions (
    decision_id     INTEGER PRIMARY KEY,
    user_id         INTEGER NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    decision_us     INTEGER NOT NULL,
    trigger         TEXT NOT NULL,              -- "schedule" or a trigger name, e.g. "sedentary"
    policy_version  TEXT NOT NULL,              -- "randomized" (cold start) or "model-v0003"
    features        TEXT NOT NULL,              -- JSON object: the context features used
    options         TEXT NOT NULL,              -- JSON object: eligible action -> probability
    ineligible      TEXT NOT NULL,              -- JSON object: type -> why not eligible
    chosen          TEXT NOT NULL,              -- an action: a catalog type or "none"
    probability     REAL NOT NULL,              -- options[chosen], logged exactly
    predicted       TEXT NOT NULL,              -- JSON object: action -> predicted outcome
    nudge_id        TEXT,                       -- set when a nudge was sent
    outcome_steps   REAL,                       -- steps in the 30 min after decision_us
    outcome_complete INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX nudge_decisions_by_user ON nudge_decisions(user_id, decision_us);
CREATE INDEX nudge_decisions_pending ON nudge_decisions(decision_us) WHERE outcome_complete = 0;

CREATE TABLE nudges (
    nudge_id        TEXT PRIMARY KEY,
    user_id         INTEGER NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    decision_id     INTEGER NOT NULL,
    nudge_type      TEXT NOT NULL,
    device_pk       INTEGER,                    -- where it was routed (changes on fallback)
    title           TEXT NOT NULL,
    message         TEXT NOT NULL,
    data            TEXT NOT NULL,              -- JSON object of type-specific strings
    probability     REAL NOT NULL,
    reasons         TEXT NOT NULL,              -- JSON array
    create_us       INTEGER NOT NULL,
    expire_us       INTEGER NOT NULL,
    deliver_us      INTEGER,                    -- written to a device stream
    state           TEXT NOT NULL,              -- pending, delivered, expired
    outcome_metric  TEXT NOT NULL,
    outcome_value   REAL,
    outcome_complete INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX nudges_by_user ON nudges(user_id, create_us);

CREATE TABLE nudge_feedback (
    feedback_id     INTEGER PRIMARY KEY,
    user_id         INTEGER NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    nudge_id        TEXT NOT NULL,
    device_pk       INTEGER NOT NULL,
    action          INTEGER NOT NULL,           -- pulsesync.v1.NudgeAction
    action_us       INTEGER NOT NULL,
    received_us     INTEGER NOT NULL
);
CREATE INDEX nudge_feedback_by_nudge ON nudge_feedback(nudge_id);
CREATE INDEX nudge_feedback_by_user ON nudge_feedback(user_id);
