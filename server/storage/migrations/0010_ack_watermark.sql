-- The upload ack's contiguous watermark per device: every seq at or below it is stored,
-- quarantined or refused for good (server/timeline/committer.py keeps it, in the same
-- transaction as the rows it covers). Devices that already uploaded start at the mark the
-- server acked them before (the highest seq held), which they may already have deleted up to.
ALTER TABLE devices ADD COLUMN ack_watermark INTEGER NOT NULL DEFAULT 0;
UPDATE devices SET ack_watermark = coalesce((
    SELECT max(seq) FROM (
        SELECT max(seq) AS seq FROM events WHERE events.device_pk = devices.device_pk
        UNION ALL
        SELECT max(seq) FROM quarantine
        WHERE quarantine.user_id = devices.user_id AND quarantine.device_pk = devices.device_pk
    )), 0);
