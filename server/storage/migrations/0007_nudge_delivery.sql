-- Nudge feedback is recorded once per action per nudge: a retried RecordNudgeFeedback and the
-- same feedback uploaded as a NudgeInteraction event (offline, retried by the outbox) are one
-- record. Duplicates already stored are folded into their first row before the unique index.

DELETE FROM nudge_feedback WHERE feedback_id NOT IN (
    SELECT MIN(feedback_id) FROM nudge_feedback GROUP BY nudge_id, action
);
DROP INDEX nudge_feedback_by_nudge;
CREATE UNIQUE INDEX nudge_feedback_once ON nudge_feedback(nudge_id, action);
