-- Nudge feedback is recorded once per action per nudge: a retried RecordNudgeFeedback and the
-- same feedback uploaded as a NudgeInteraction event (offline, retried by the outbox) are one
-- record. Duplicates already stored are folded into their first row before the unique index.

DELETE FROM nudge_feedback WHERE feedback_id NOT IN (
    SELECT MIN(feedback_id) FROM nudge_feedback GROUP BY nudge_id, action
);
DROP INDEX nudge_feedback_by_nudge;
CREATE UNIQUE INDEX nudge_feedback_once ON nudge_feedback(nudge_id, action);

-- Devices that can be woken by a push (the token means something to the operator's gateway),
-- and how each nudge reached its device: stream, push or pending (fetched by the app).
CREATE TABLE nudge_push_targets (
    device_pk       INTEGER PRIMARY KEY REFERENCES devices(device_pk) ON DELETE CASCADE,
    user_id         INTEGER NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    push_token      TEXT NOT NULL,
    update_us       INTEGER NOT NULL
);
ALTER TABLE nudges ADD COLUMN channel TEXT;     -- stream, push or pending; NULL until delivered
