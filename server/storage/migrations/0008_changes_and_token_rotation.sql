-- The change feed of a person's timeline (TimelineService.ListEventChanges): one row per run of
-- consecutive sequence numbers a commit inserted for a device, appended in the same transaction
-- as the events. One writer commits at a time and AUTOINCREMENT never reuses an id, so
-- change_id order is commit order and a reader never sees a change without every earlier one.
-- A row per run (a 500-event batch is one row), not per event: the ingest path stays an append
-- of events. Runs hold no gap, so every stored event lies in exactly one row.
CREATE TABLE event_changes (
    change_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id     INTEGER NOT NULL,               -- no foreign key, as in events: erasure deletes by user_id
    device_pk   INTEGER NOT NULL,
    seq_low     INTEGER NOT NULL,
    seq_high    INTEGER NOT NULL,
    commit_us   INTEGER NOT NULL                -- the batch's receive time
);
CREATE INDEX event_changes_by_user ON event_changes(user_id, change_id);

-- Events stored before the feed existed: one change per run of consecutive seqs, oldest first.
INSERT INTO event_changes (user_id, device_pk, seq_low, seq_high, commit_us)
SELECT user_id, device_pk, min(seq), max(seq), max(received_us)
FROM (
    SELECT user_id, device_pk, seq, received_us,
           seq - row_number() OVER (PARTITION BY device_pk ORDER BY seq) AS run
    FROM events
)
GROUP BY device_pk, run
ORDER BY max(received_us), device_pk, min(seq);

-- Token rotation (DeviceService.RotateDeviceToken): when the current token was issued (NULL:
-- at pairing), and the token it replaced, still accepted until prev_token_expire_us so that a
-- device whose rotation response was lost can retry with the token it holds.
ALTER TABLE devices ADD COLUMN token_issue_us INTEGER;
ALTER TABLE devices ADD COLUMN prev_token_hash BLOB;
ALTER TABLE devices ADD COLUMN prev_token_expire_us INTEGER;
CREATE UNIQUE INDEX devices_by_prev_token ON devices(prev_token_hash)
    WHERE prev_token_hash IS NOT NULL;
